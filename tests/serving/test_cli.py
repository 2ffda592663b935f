"""`python -m serving` and `python -m serving.client` as a user runs them."""

import subprocess
import sys

import pytest

from serving import cli
from serving import client as client_cli
from serving.server import free_port


def test_help_explains_itself():
    out = subprocess.run([sys.executable, "-m", "serving", "--help"], capture_output=True, text=True, check=True).stdout
    for words in ("--runs", "--target", "--generate-only", "--http-port", "--max-batch-size", "127.0.0.1", "Ctrl-C"):
        assert words in out


def test_generate_only(fake_runs, tmp_path):
    repo = tmp_path / "repo"
    code = cli.main(
        [
            "--runs",
            str(fake_runs["sentiment"]),
            str(fake_runs["nli"]),
            "--repository",
            str(repo),
            "--generate-only",
            "--max-batch-size",
            "4",
            "--no-warmup",
        ]
    )
    assert code == 0
    config = (repo / "backbone" / "config.pbtxt").read_text()
    assert "max_batch_size: 4" in config and "model_warmup" not in config


def test_gpu_target_prints_how_to_run_it(fake_runs, tmp_path, capsys):
    assert (
        cli.main(
            [
                "--runs",
                str(fake_runs["sentiment"]),
                "--repository",
                str(tmp_path / "r"),
                "--target",
                "gpu",
                "--generate-only",
            ]
        )
        == 0
    )
    assert "nvcr.io/nvidia/tritonserver" in capsys.readouterr().out


def test_bad_config_and_missing_run_fail_with_a_message(fake_runs, tmp_path, caplog):
    assert (
        cli.main(
            [
                "--runs",
                str(fake_runs["sentiment"]),
                "--repository",
                str(tmp_path / "r"),
                "--generate-only",
                "--max-batch-size",
                "0",
            ]
        )
        == 1
    )
    assert "serve.max_batch_size" in caplog.text
    assert cli.main(["--runs", str(tmp_path / "missing"), "--repository", str(tmp_path / "r"), "--generate-only"]) == 1
    assert "make export" in caplog.text


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_says_which_url_is_down(protocol, capsys):
    url = f"127.0.0.1:{free_port()}"
    assert client_cli.main(["--task", "sentiment", "--url", url, "--protocol", protocol, "some text"]) == 3
    err = capsys.readouterr().err
    assert url in err and "make serve" in err


@pytest.mark.slow
def test_client_cli_against_a_server(served, specs, tmp_path, capsys):
    single, pair = specs["single"], specs["pair"]
    texts = tmp_path / "texts.txt"
    texts.write_text("the film was great\n\nawful plot\n")
    assert client_cli.main(["--task", single.task, "--url", served.http_url, "--file", str(texts)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[0] in single.labels and f"{single.labels[-1]}=" in lines[0]
    assert (
        client_cli.main(
            [
                "--task",
                pair.task,
                "--url",
                served.grpc_url,
                "--protocol",
                "grpc",
                "--json",
                "--pair-sep",
                "|",
                "a man sleeps|a person rests",
            ]
        )
        == 0
    )
    assert '"label"' in capsys.readouterr().out
    assert client_cli.main(["--task", "nope", "--url", served.http_url, "x"]) == 4
    assert str(sorted([single.task, pair.task])) in capsys.readouterr().err
