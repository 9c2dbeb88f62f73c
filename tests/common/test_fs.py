"""Durable-file helpers: moving a file into place without ever replacing one."""
from __future__ import annotations

import hashlib
import os

import pytest

from minitorrent.common import fs
from minitorrent.common.fs import regular_file_sha256, rename_noreplace


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


class TestRegularFileSha256:
    def test_a_regular_file_and_a_link_to_one(self, tmp_path):
        """A regular file's SHA-256, through a link too unless links are not followed."""
        (tmp_path / "a.txt").write_bytes(b"abc")
        (tmp_path / "link").symlink_to(tmp_path / "a.txt")
        expected = hashlib.sha256(b"abc").hexdigest()
        assert (expected, expected, "") == (regular_file_sha256(tmp_path / "a.txt"), regular_file_sha256(tmp_path / "link"),
                                            regular_file_sha256(tmp_path / "link", follow_links=False))

    @pytest.mark.timeout(10)
    def test_a_fifo_is_not_a_file_and_never_blocks(self, tmp_path):
        """A FIFO (no writer: reading it would wait for ever) is "", at once; so are a folder and a missing name."""
        os.mkfifo(tmp_path / "pipe")
        (tmp_path / "folder").mkdir()
        assert ["", "", ""] == [regular_file_sha256(tmp_path / name) for name in ("pipe", "folder", "missing")]

    def test_in_a_folder_descriptor_and_by_owner(self, tmp_path):
        """Named in a folder's descriptor; a file of another owner than the one asked for is ""."""
        (tmp_path / "a.txt").write_bytes(b"abc")
        folder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            mine = regular_file_sha256("a.txt", folder, owner=os.geteuid())
            theirs = regular_file_sha256("a.txt", folder, owner=os.geteuid() + 1)
        finally:
            os.close(folder)
        assert (hashlib.sha256(b"abc").hexdigest(), "") == (mine, theirs)


class TestOpenedInside:
    def test_what_was_opened_is_checked_not_the_path(self, tmp_path):
        """A folder inside (or the top itself) is inside; one reached through a link leading out is not."""
        top, elsewhere = tmp_path / "top", tmp_path / "elsewhere"
        (top / "a").mkdir(parents=True)
        elsewhere.mkdir()
        (top / "out").symlink_to(elsewhere)
        found = []
        for folder in (top, top / "a", top / "out"):
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                found.append(fs.opened_inside(fd, os.path.realpath(top)))
            finally:
                os.close(fd)
        assert [True, True, False] == found
