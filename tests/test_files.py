"""files.write_atomic: the file is replaced whole, or left as it was."""
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
