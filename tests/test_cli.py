"""The CLI's full log: every command that writes a folder keeps FOLDER/logs/COMMAND-TIME.log."""

import logging
import sys
import tempfile
from pathlib import Path

import pytest
from tqdm import tqdm

from histodiff_ray.cli import COMMANDS, main
from histodiff_ray.config import load_config
from histodiff_ray.console import log_to_file, note_in_log
from histodiff_ray.storage import list_files, open_location, read_bytes
from tests.data.test_ingest import make_labeled_input


def test_the_log_file_holds_the_console_and_what_quiet_mode_keeps_off_it(tmp_path, capsys):
    path = tmp_path / "logs" / "x.log"
    levels = {name: logging.getLogger(name).level for name in ("", "ray", "ray.data", "some.library")}
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # as init_ray leaves it in quiet mode
    with log_to_file(str(path), ["histodiff x --flag"]):
        print("[stage] a line for the console")
        logging.getLogger("ray.data").info("an INFO record of Ray's")
        logging.getLogger("some.library").info("an INFO record of another library")
        for _ in tqdm(range(3), desc="stage", file=sys.stderr, mininterval=0):
            pass
        # As Ray forwards a worker's line: print writes the text, then its newline.
        print(
            "[E core_worker.cc] Actor 'PreemptionWatcher' has constructor arguments in the object store and "
            "max_restarts > 0.",
            file=sys.stderr,
        )
        for _ in range(2):  # as each stage of a pipeline connects to Ray
            note_in_log("Ray cluster 127.0.0.1:6379")
    console = capsys.readouterr()
    text = path.read_text()
    assert text.startswith("# histodiff x --flag\n")
    assert "[stage] a line for the console" in console.out and "[stage] a line for the console" in text
    for record in ("an INFO record of Ray's", "an INFO record of another library"):
        assert record in text and record not in console.out + console.err
    # The bar's redraws stay on the console; the file keeps its last state, once.
    assert "\r" not in text and text.count("stage: 100%") == 1
    assert text.count("# Ray cluster 127.0.0.1:6379\n") == 1 and "Ray cluster" not in console.out + console.err
    # Ray's noise about its own actors is in the file only, its newline too.
    assert "PreemptionWatcher" in text and "PreemptionWatcher" not in console.err and "\n\n" not in console.err
    # Afterwards the console and the loggers are as they were.
    assert type(sys.stdout).__name__ != "_Tee" and type(sys.stderr).__name__ != "_Tee"
    assert logging.getLogger("ray.data").level == logging.ERROR
    logging.getLogger("ray.data").setLevel(levels["ray.data"])
    assert {name: logging.getLogger(name).level for name in levels} == levels
    logging.getLogger("some.library").warning("after the block")
    assert "after the block" not in path.read_text()


def test_the_log_file_keeps_an_exception_and_lets_go_of_handlers_made_inside(tmp_path, capsys):
    path = tmp_path / "x.log"
    made_inside = logging.StreamHandler()  # as ray.init makes its console handlers: on sys.stderr, the tee
    with pytest.raises(RuntimeError), log_to_file(str(path), []):
        logging.getLogger("made.inside").addHandler(made_inside)
        sys.stderr.write("a bar cut short")
        raise RuntimeError("a bug, not a HistodiffError")
    text = path.read_text()
    assert "a bar cut short" in text and "RuntimeError: a bug, not a HistodiffError" in text
    assert made_inside.stream is sys.stderr
    logging.getLogger("made.inside").error("after the block")
    logging.getLogger("made.inside").removeHandler(made_inside)
    assert "after the block" in capsys.readouterr().err and "after the block" not in path.read_text()


def test_every_command_that_writes_a_folder_names_it_for_its_log():
    by_name = {c.name: c for c in COMMANDS}
    for name in ("stream", "sample"):  # they write no folder
        assert by_name[name].log_to is None
    for command in COMMANDS:
        if command.log_to:
            assert any(f"--{command.log_to}" in flags for flags, _ in command.args), command.name


def test_a_command_logs_into_its_output_folder_on_s3_with_credentials_masked(
    tmp_path, shared_data, s3, s3_overrides, bucket, capsys
):
    source = make_labeled_input(tmp_path / "input", shared_data, classes=("AC", "T"), per_class=12)
    output = f"s3://{bucket}/tiles"
    assert main(["ingest", "--input", str(source), "--labeled", "--output", output, *s3_overrides]) == 0
    console = capsys.readouterr()
    folder = open_location(output, load_config("cpu", s3_overrides).storage)
    logs = [n for n in list_files(folder) if n.startswith("logs/")]
    assert len(logs) == 1 and logs[0].startswith("logs/ingest-") and logs[0].endswith(".log")
    assert "logs/" not in console.err  # the log's place is in --help and the README, not on the console
    text = read_bytes(folder.join(logs[0])).decode()
    assert f"--output {output}" in text and "storage.secret_access_key=***" in text
    assert [line for line in text.splitlines() if s3.secret_key in line] == []
    assert f"tile set: {output}/manifest.json" in text  # the console's summary, time-stamped
    # A failing command logs its error too.
    assert main(["ingest", "--input", str(tmp_path / "nothing"), "--labeled", "--output", output, *s3_overrides]) == 2
    second = {n for n in list_files(folder) if n.startswith("logs/")} - set(logs)
    assert len(second) == 1 and "histodiff: error:" in read_bytes(folder.join(second.pop())).decode()


def test_a_log_that_cannot_be_uploaded_stays_local_and_the_error_stays_one_line(tmp_path, s3, s3_overrides, capsys):
    wrong_secret = [o for o in s3_overrides if "secret" not in o] + ["storage.secret_access_key=wrong"]
    args = ["ingest", "--input", str(tmp_path / "nothing"), "--labeled", "--output", "s3://any/tiles"]
    local_logs = Path(tempfile.gettempdir()) / "histodiff-logs"
    before = set(local_logs.glob("ingest-*.log"))
    assert main([*args, *wrong_secret]) == 2
    (error,) = capsys.readouterr().err.splitlines()
    assert error.startswith("histodiff: error:")
    (local,) = set(local_logs.glob("ingest-*.log")) - before
    assert error in local.read_text()
    local.unlink()
