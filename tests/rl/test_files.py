"""rl/files.py: atomic writes, and folders as values (how checkpoints cross hosts)."""

import pytest

from rl.files import folder_files, write_atomic, write_files


def test_a_folder_travels_as_a_value_and_is_laid_out_again(tmp_path):
    source = tmp_path / "a"
    write_atomic(source / "adapter" / "adapter_config.json", "{}")
    (source / "learner_state.pt").write_bytes(bytes(range(256)) * 3)
    files = folder_files(source)
    assert sorted(files) == ["adapter/adapter_config.json", "learner_state.pt"]
    copy = write_files(tmp_path / "b", files)
    assert folder_files(copy) == files


def test_a_file_name_may_not_leave_the_folder(tmp_path):
    with pytest.raises(ValueError, match="leaves"):
        write_files(tmp_path / "b", {"../escaped": b"x"})
    assert not (tmp_path / "escaped").exists()


def test_an_atomic_write_is_readable_like_any_result_file(tmp_path):
    write_atomic(tmp_path / "results.json", "{}")
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644
