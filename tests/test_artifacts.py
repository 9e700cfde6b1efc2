"""Artifacts: written atomically, never over a directory undo did not write, nothing left by a failed write."""

import errno
import json

import pytest

from undo.artifacts import Artifact
from undo.errors import UndoError


def files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_write_replaces_an_artifact_of_the_same_kind(tmp_path):
    art = Artifact(tmp_path, "unlearn")
    art.write("k1", {"kind": "unlearn"}, extra_files={"a.txt": "one"})
    art.write("k2", {"kind": "unlearn"}, extra_files={"b.txt": "two"})  # a rerun with other settings
    assert art.is_done("k2") and sorted(files(art.dir)) == ["b.txt", "result.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unlearn"]


@pytest.mark.parametrize("make", [
    lambda d: (d / "thesis.tex").write_text("mine"),
    lambda d: (d / "result.json").write_text(json.dumps({"written": "by someone else"})),
])
def test_write_refuses_a_directory_undo_did_not_write(tmp_path, make):
    art = Artifact(tmp_path, "stage")
    art.dir.mkdir()
    make(art.dir)
    before = files(art.dir)
    with pytest.raises(UndoError, match="exists and holds files undo did not write"):
        art.write("k1", {"kind": "distill"}, extra_files={"a.txt": "new"})
    assert files(art.dir) == before and sorted(p.name for p in tmp_path.iterdir()) == ["stage"]
    art.write("k1", {"kind": "distill"}, extra_files={"a.txt": "new"}, force=True)  # asked for: replaced
    assert art.is_done("k1") and not (tmp_path / "stage.old").exists()


def test_an_artifact_of_another_kind_is_replaced_in_a_run_and_refused_when_a_kind_is_asked_for(tmp_path):
    """In a run, `unlearn/graddiff` turns from an unlearn stage into a selection when the recipe
    gets a sweep: replaced. A stage command naming its output (`undo distill --name`) asks for its kind."""
    art = Artifact(tmp_path, "graddiff")
    art.write("k1", {"kind": "unlearn"})
    with pytest.raises(UndoError, match=r"graddiff holds the artifact of another kind of stage \(unlearn, not distill\)"):
        art.check_replaceable("distill")
    art.check_replaceable("unlearn")
    art.write("k2", {"kind": "select"})
    assert art.result()["kind"] == "select"


def test_a_failed_write_leaves_no_partial_and_the_old_artifact_in_place(tmp_path, monkeypatch):
    art = Artifact(tmp_path, "stage")
    art.write("k1", {"kind": "noise"}, extra_files={"a.txt": "old"})
    real_write_text = type(art.dir).write_text

    def full_disk(self, text, *a, **kw):
        if self.name == "result.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, text, *a, **kw)

    monkeypatch.setattr(type(art.dir), "write_text", full_disk)
    with pytest.raises(UndoError, match=r"cannot write .*stage \(No space left on device at .*result.json\); free disk"):
        art.write("k2", {"kind": "noise"}, extra_files={"a.txt": "new"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"] and art.is_done("k1")
    assert files(art.dir)["a.txt"] == b"old"
