"""Folder walking without silent gaps: symlinked folders followed (loops caught), broken links counted with an
error row, a file reached under two names screened once and reported, unsupported files counted, unlistable
folders failing the run. Real files and real symbolic links; the CLI over them."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from conftest import save_gray, synthetic_xray

from pneumoscan.cli import main
from pneumoscan.data.walk import walk


@pytest.fixture
def tree(tmp_path) -> Path:
    """root/a/{1,2}.png, root/b/{3,4,5}.jpeg, root/linked -> ../elsewhere (6 images), root/notes.txt"""
    root = tmp_path / "root"
    for name in ("1.png", "2.png"):
        save_gray(root / "a" / name, synthetic_xray(64, seed=len(name)))
    for i in (3, 4, 5):
        save_gray(root / "b" / f"{i}.jpeg", synthetic_xray(64, seed=i))
    for i in range(6):
        save_gray(tmp_path / "elsewhere" / f"e{i}.png", synthetic_xray(64, seed=10 + i))
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "notes.txt").write_text("x")
    return root


def test_a_symlinked_folder_is_walked_like_any_other(tree):
    found = walk([tree])
    names = [p.name for p in found.files]
    assert names == ["1.png", "2.png", "3.jpeg", "4.jpeg", "5.jpeg", *(f"e{i}.png" for i in range(6))]
    assert found.skipped == {".txt": 1} and not found.revisits and not found.duplicates and not found.broken


def test_a_link_back_to_an_ancestor_is_reported_as_a_loop_and_not_followed(tree):
    (tree / "a" / "up").symlink_to(tree, target_is_directory=True)
    found = walk([tree])
    assert len(found.files) == 11  # each image once, the walk ended
    ((link, target, loop),) = found.revisits
    assert link == tree / "a" / "up" and loop
    assert "which contains it (a loop): not walked again" in found.notices()[0]


def test_two_links_to_one_folder_walk_it_once_and_say_so(tree, tmp_path):
    (tree / "again").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    found = walk([tree])
    assert len(found.files) == 11
    ((link, target, loop),) = found.revisits
    assert link == tree / "linked" and target == tree / "again" and not loop  # sorted: "again" came first


def test_a_file_named_twice_is_screened_once_and_the_second_name_reported(tree):
    image = tree / "a" / "1.png"
    (tree / "b" / "alias.png").symlink_to(image)
    found = walk([tree, image])
    assert found.files.count(image) == 1 and tree / "b" / "alias.png" not in found.files
    assert sorted((str(again), str(first)) for again, first in found.duplicates) == sorted(
        [(str(tree / "b" / "alias.png"), str(image)), (str(image), str(image))])
    assert any(line.endswith(f"screened once, as {image}") for line in found.notices())


def test_a_broken_link_is_taken_so_it_gets_an_error_row_and_is_counted(tree):
    (tree / "b" / "gone.png").symlink_to(tree / "nowhere.png")
    (tree / "b" / "gone.txt").symlink_to(tree / "nowhere.txt")
    found = walk([tree])
    assert found.broken == [tree / "b" / "gone.png"] and tree / "b" / "gone.png" in found.files
    assert found.skipped[".txt"] == 2  # an unsupported suffix is counted like any other such file
    assert "1 broken symbolic link (each has an error row)" in found.notices()


def test_cli_screens_linked_folders_and_reports_every_gap_with_exit_1_for_a_broken_link(tree, tiny_model_path,
                                                                                        tmp_path, capsys):
    (tree / "a" / "up").symlink_to(tree, target_is_directory=True)
    (tree / "b" / "gone.png").symlink_to(tree / "nowhere.png")
    (tree / "b" / "alias.png").symlink_to(tree / "a" / "1.png")
    out = tmp_path / "rows.csv"
    assert main(["predict", str(tree), "--model", str(tiny_model_path), "--csv", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12  # 11 images and the broken link's error row, the alias not twice
    assert sum(r["status"] == "ok" for r in rows) == 11
    (broken,) = [r for r in rows if r["status"] == "error"]
    assert broken["path"] == str(tree / "b" / "gone.png") and "not found" in broken["message"]
    assert f"pneumoscan: {tree / 'a' / 'up'}: a link to {tree}, which contains it (a loop): not walked again" in err
    assert f"pneumoscan: {tree / 'b' / 'alias.png'}: the same file as {tree / 'a' / '1.png'}: screened once, as " \
           f"{tree / 'a' / '1.png'}" in err
    assert "pneumoscan: 1 broken symbolic link (each has an error row)" in err
    assert "pneumoscan: 1 file skipped (not images: .txt 1)" in err
    assert "pneumoscan: 1 file(s) could not be read" in err


def test_a_folder_that_cannot_be_listed_fails_the_run_in_one_line(tree, tiny_model_path, capsys, monkeypatch):
    """Permissions would not stop root (the CI user), so the listing is refused as the kernel would refuse it."""
    locked = tree / "b"
    real_scandir = os.scandir

    def scandir(path):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert main(["predict", str(tree), "--model", str(tiny_model_path), "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert f"pneumoscan: error: {locked}: cannot list this folder (Permission denied): its files were not " \
           "screened" in err.splitlines()
    assert len(out.splitlines()) == 8  # the other folders' images were screened
