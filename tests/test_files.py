"""files: write_atomic replaces a file whole or leaves it as it was; unwritable says why a
path cannot be written."""
import pytest

from llm_jax import files


def test_write_atomic_replaces_whole_and_leaves_nothing_beside(tmp_path):
    path = tmp_path / "out.json"
    files.write_atomic(str(path), "old")
    files.write_atomic(str(path), "new text")
    assert path.read_text() == "new text"
    files.write_atomic(str(path), b"\x00bytes")
    assert path.read_bytes() == b"\x00bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.json"
    files.write_atomic(str(path), "old")
    with pytest.raises(TypeError):  # the temporary file exists when its write fails
        files.write_atomic(str(path), 123)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_unwritable_says_why_by_trying(tmp_path):
    (tmp_path / "f").write_text("x")
    assert files.unwritable(str(tmp_path / "out.json")) is None
    assert files.unwritable(str(tmp_path / "f")) is None  # a file to replace
    assert files.unwritable(str(tmp_path)) == "it is a directory"
    assert "does not exist" in files.unwritable(str(tmp_path / "no" / "out.json"))
    assert files.unwritable(str(tmp_path / "f"), directory=True) == "it is a file, not a directory"
    assert files.unwritable(str(tmp_path / "new" / "dir"), directory=True) is None
    assert (tmp_path / "new" / "dir").is_dir()  # made, as the profiler would
    assert files.unwritable("/proc/out.json")  # root passes os.access there; writing fails
    assert files.unwritable("/proc/trace", directory=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "new"]  # no probe files left
