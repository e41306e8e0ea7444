"""``api-adapter``: bad input ends in one message and exit 2, a closed pipe ends quietly, and
every command's ``--help`` names files that exist."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.cli import COMMANDS

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args, named", [
    (("train", "--help-config", "nosuch"), "'nosuch': no such section"),
    (("train", "--config", "/no/such/config.yaml"), "/no/such/config.yaml"),
    (("train", "--config", "configs"), "cannot read the config file: Is a directory"),
    (("ablate", "--configs", "/no/such/config.yaml"), "No such file or directory"),
])
def test_bad_config_input_is_one_message_and_exit_2(args, named):
    done = cli(*args)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ")


def test_a_closed_pipe_ends_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "scripts.cli", "train", "--help-config"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first write
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
    assert proc.returncode == 1


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_help_names_files_that_exist(command, capsys):
    module = importlib.import_module(COMMANDS[command][0])
    try:
        code = module.main(["--help"])
    except SystemExit as done:  # argparse's --help
        code = done.code
    assert code in (0, None)
    text = (module.__doc__ or "") + capsys.readouterr().out
    cited = set(re.findall(r"(?:configs|scripts|results|docs)/[\w./-]+\.(?:yaml|py|sh|json|md)", text))
    missing = sorted(c for c in cited if not (REPO / c).exists())
    assert not missing, f"{command} --help cites {missing}"
