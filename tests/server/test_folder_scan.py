"""Shared folders on the server: the scan's rules, folder names in the catalog, remove and rename, replication."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SHORT_TIMEOUT, make_config, make_file, wait_until

from error_handler import CatalogError
from integrity import sha256_file
from minitorrent.server.backup import BackupServer
from minitorrent.server.catalog import Catalog, numbered_name
from minitorrent.server.folder_scan import scan_folder

SECRET = "correct horse battery staple"


@pytest.fixture
def catalog(tmp_path) -> Catalog:
    catalog = Catalog(tmp_path / "data", 64 * 1024)
    yield catalog
    catalog.close()


def names(catalog: Catalog) -> list[str]:
    return [entry["name"] for entry in catalog.list_files()[0]]


class TestScan:
    def test_nested_files_get_relative_names(self, tmp_path):
        """Every regular file is named <folder>/<path inside it>, sorted."""
        make_file(tmp_path / "photos" / "2024" / "beach.jpg", 10)
        make_file(tmp_path / "photos" / "a.txt", 1)
        assert ["photos/2024/beach.jpg", "photos/a.txt"] == [name for _, name in scan_folder(tmp_path / "photos").files]

    def test_link_outside_is_skipped_with_a_warning(self, tmp_path):
        """A link leading outside the folder is not shared; a link to a file inside it is."""
        make_file(tmp_path / "secret.txt", 5)
        make_file(tmp_path / "photos" / "real.txt", 5)
        (tmp_path / "photos" / "out.txt").symlink_to(tmp_path / "secret.txt")
        (tmp_path / "photos" / "in.txt").symlink_to(tmp_path / "photos" / "real.txt")
        scan = scan_folder(tmp_path / "photos")
        assert ["photos/in.txt", "photos/real.txt"] == [name for _, name in scan.files]
        assert 1 == sum("leads outside the folder" in line for line in scan.skipped)

    def test_folder_links_and_fifos_are_skipped(self, tmp_path):
        """A link to a folder is not followed and a pipe is not a regular file: both skipped, both said."""
        (tmp_path / "photos").mkdir()
        (tmp_path / "photos" / "loop").symlink_to(tmp_path / "photos")
        os.mkfifo(tmp_path / "photos" / "pipe")
        scan = scan_folder(tmp_path / "photos")
        assert ([], 2) == (scan.files, len(scan.skipped))

    def test_unsafe_names_on_disk_are_skipped(self, tmp_path):
        """A file whose name holds a control character is skipped with the rule it breaks."""
        make_file(tmp_path / "photos" / "bad\nname.txt", 1)
        make_file(tmp_path / "photos" / "good.txt", 1)
        scan = scan_folder(tmp_path / "photos")
        assert (["photos/good.txt"], 1) == ([name for _, name in scan.files], len(scan.skipped))


class TestCatalogFolders:
    def test_ten_thousand_entries_in_one_folder(self, catalog, tmp_path):
        """10,000 tiny files in one folder are all added and listed under their relative names."""
        folder = tmp_path / "many"
        folder.mkdir()
        for i in range(10_000):
            (folder / f"f{i:05d}").write_bytes(b"%d" % i)
        results, warnings = catalog.add_folder(folder)
        assert (10_000, [], 10_000) == (len(results), warnings, catalog.count_files()[0])
        assert 10_000 == len(catalog.names_at("many/"))

    def test_names_differing_only_in_case_are_two_files(self, catalog, tmp_path):
        """Case.txt and case.txt are distinct names with their own content."""
        make_file(tmp_path / "f" / "Case.txt", 3, seed=1)
        make_file(tmp_path / "f" / "case.txt", 4, seed=2)
        catalog.add_folder(tmp_path / "f")
        assert ["f/Case.txt", "f/case.txt"] == names(catalog)

    def test_empty_folders_are_not_entries(self, catalog, tmp_path):
        """An empty folder shares nothing and breaks nothing."""
        (tmp_path / "f" / "empty" / "deeper").mkdir(parents=True)
        make_file(tmp_path / "f" / "x.txt", 1)
        results, warnings = catalog.add_folder(tmp_path / "f")
        assert (["f/x.txt"], []) == ([r.record.name for r in results], warnings)

    def test_a_shared_file_cannot_become_a_folder(self, catalog, tmp_path):
        """With a file named photos shared, photos/x is refused (no disk holds both)."""
        catalog.add_file(make_file(tmp_path / "photos", 1))
        make_file(tmp_path / "x" / "photos" / "a.txt", 1)
        results, warnings = catalog.add_folder(tmp_path / "x" / "photos")
        assert ([], 1) == (results, len(warnings))

    def test_a_file_named_like_a_folder_is_numbered(self, catalog, tmp_path):
        """A file added as photos while the folder photos/ is shared gets the next free name."""
        catalog.add_folder(make_file(tmp_path / "x" / "photos" / "a.txt", 1).parent)
        result = catalog.add_file(make_file(tmp_path / "photos", 2))
        assert ("photos (2)", "renamed") == (result.record.name, result.outcome)

    def test_numbering_touches_only_the_last_component(self):
        """A dot in a folder's name does not move the number into the folder."""
        assert "v1.0/readme (2)" == numbered_name("v1.0/readme", 2)
        assert "v1.0/notes (2).txt" == numbered_name("v1.0/notes.txt", 2)

    def test_a_file_that_is_not_a_folder_is_refused(self, catalog, tmp_path):
        """add_folder on a file is a CatalogError."""
        with pytest.raises(CatalogError):
            catalog.add_folder(make_file(tmp_path / "a.txt", 1))


class TestRemoveAndRename:
    @pytest.fixture
    def shared(self, catalog, tmp_path) -> Catalog:
        for name in ("photos/2024/a.jpg", "photos/2024/b.jpg", "photos/c.txt", "photosphere.txt"):
            make_file(tmp_path / "src" / name, 10, seed=len(name))
        catalog.add_folder(tmp_path / "src" / "photos")
        catalog.add_file(tmp_path / "src" / "photosphere.txt")
        return catalog

    def test_remove_a_folder_removes_only_what_is_in_it(self, shared):
        """Removing photos/2024 removes its two files, not photos/c.txt nor photosphere.txt."""
        assert 2 == shared.remove_path("photos/2024")
        assert ["photos/c.txt", "photosphere.txt"] == names(shared)

    def test_rename_a_folder_moves_everything_in_it(self, shared):
        """Renaming photos to pictures renames every file under it and nothing else."""
        assert 3 == shared.rename_path("photos", "pictures/old")
        assert ["photosphere.txt", "pictures/old/2024/a.jpg", "pictures/old/2024/b.jpg",
                "pictures/old/c.txt"] == names(shared)

    def test_rename_a_file(self, shared):
        """A single file renamed keeps its content and its download count."""
        shared.record_download("photos/c.txt", shared.db.get_file("photos/c.txt").sha256)
        shared.rename_path("photos/c.txt", "c.txt")
        assert 1 == shared.db.get_file("c.txt").downloads

    @pytest.mark.parametrize("old, new", [
        ("photos", "photosphere.txt"),  # onto a file
        ("photos/2024/a.jpg", "photos/2024/b.jpg"),  # onto a file
        ("photos", "photos/inside"),  # into itself
        ("nothing", "x"),  # nothing there
        ("photos/c.txt", "../c.txt"),  # unsafe
        ("photosphere.txt", "photos/2024/a.jpg/x"),  # under a file
    ])
    def test_bad_renames_change_nothing(self, shared, old, new):
        """A rename onto a taken name, into itself, of nothing, or to an unsafe name is refused whole."""
        before = names(shared)
        with pytest.raises(CatalogError):
            shared.rename_path(old, new)
        assert before == names(shared)


class TestReplicatedToBackup:
    def test_folder_rename_and_remove_reach_the_backup(self, tmp_path, server_factory):
        """A folder added, renamed, then partly removed on the main is mirrored by the backup."""
        config = make_config(tmp_path / "backup", {"server": {"secret": SECRET, "backup": {
            "heartbeat_interval": 1, "heartbeat_timeout": 60}}})
        backup = BackupServer(config)
        backup.start()
        try:
            main = server_factory({"server": {"secret": SECRET, "backup": {"port": backup.server.address[1],
                                                                           "heartbeat_interval": 0.2}}})
            a = make_file(tmp_path / "src" / "photos" / "a.jpg", 100, seed=1)
            make_file(tmp_path / "src" / "photos" / "sub" / "b.jpg", 100, seed=2)
            main.add_folder(tmp_path / "src" / "photos")
            main.rename_path("photos", "pictures")
            main.remove_path("pictures/sub/")
            expected = {"pictures/a.jpg": sha256_file(a)}
            wait_until(lambda: main.backup_holds() == expected, SHORT_TIMEOUT, "the backup to follow")
            assert ["pictures/a.jpg"] == names(backup.catalog)
        finally:
            backup.stop()


class TestCommandLine:
    def run(self, config: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "main_server.py"), "--config", str(config), "--headless",
                               *args], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def test_add_dir_then_rename_then_remove(self, tmp_path, server_factory):
        """--add DIR, --rename and --remove edit the catalog of the main already running there, which serves it at once."""
        running = server_factory(folder=tmp_path / "srv")
        make_file(tmp_path / "src" / "photos" / "2024" / "beach.jpg", 10)
        make_file(tmp_path / "src" / "photos" / "x.txt", 10, seed=1)
        done = self.run(tmp_path / "srv" / "config.yaml", "--add", str(tmp_path / "src" / "photos"),
                        "--rename", "photos/2024", "photos/old", "--remove", "photos/x.txt")
        assert (0, ["photos/old/beach.jpg"]) == (done.returncode, names(running.catalog)), done.stderr

    def test_a_failed_add_still_applies_the_removal(self, tmp_path, server_factory):
        """An --add that fails does not skip the --remove given with it: the removal happens, the exit is 1."""
        running = server_factory(folder=tmp_path / "srv")
        running.add_file(make_file(tmp_path / "src" / "old.bin", 10))
        done = self.run(tmp_path / "srv" / "config.yaml", "--add", str(tmp_path / "src" / "missing.bin"),
                        "--remove", "old.bin")
        assert (1, []) == (done.returncode, names(running.catalog)), done.stderr

    def test_remove_of_nothing_fails(self, tmp_path, server_factory):
        """--remove of a path that is not shared exits 1 with one line."""
        server_factory(folder=tmp_path / "srv")
        done = self.run(tmp_path / "srv" / "config.yaml", "--remove", "nothing/")
        assert (1, "error: nothing/: not shared\n") == (done.returncode, done.stderr)
