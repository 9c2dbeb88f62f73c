"""Durable-file helpers: moving a file into place without ever replacing one."""
from __future__ import annotations

import pytest

from minitorrent.common import fs
from minitorrent.common.fs import rename_noreplace


@pytest.fixture(params=["renameat2", "link and unlink"])
def mover(request, monkeypatch):
    """rename_noreplace as the kernel gives it, and as the fallback where renameat2 is missing."""
    if request.param == "link and unlink":
        monkeypatch.setattr(fs, "_renameat2", None)
    return rename_noreplace


class TestRenameNoReplace:
    def test_a_file_is_moved_to_a_free_name(self, tmp_path, mover):
        """The source's bytes end under the target name and the source name is gone."""
        (tmp_path / "staged").write_bytes(b"verified")
        mover(str(tmp_path / "staged"), str(tmp_path / "final"))
        assert (b"verified", False) == ((tmp_path / "final").read_bytes(), (tmp_path / "staged").exists())

    def test_an_existing_target_is_never_replaced(self, tmp_path, mover):
        """A target that exists raises FileExistsError; both files stay as they were."""
        (tmp_path / "staged").write_bytes(b"verified")
        (tmp_path / "final").write_bytes(b"the user's")
        with pytest.raises(FileExistsError):
            mover(str(tmp_path / "staged"), str(tmp_path / "final"))
        assert (b"the user's", b"verified") == ((tmp_path / "final").read_bytes(), (tmp_path / "staged").read_bytes())

    def test_a_missing_source_is_an_error(self, tmp_path, mover):
        """Nothing to move raises FileNotFoundError and creates nothing."""
        with pytest.raises(FileNotFoundError):
            mover(str(tmp_path / "gone"), str(tmp_path / "final"))
        assert not (tmp_path / "final").exists()
