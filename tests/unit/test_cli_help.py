"""The CLI's own words: --version, and help without rich's `<bool>` after every flag."""

from importlib import metadata

from typer.testing import CliRunner

from flows.cli import app


def test_version_and_plain_help():
    runner = CliRunner()
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.strip() == f"graft {metadata.version('graft')}"
    for args in (["--help"], ["run", "--help"], ["drift", "--help"], ["server", "start", "--help"]):
        res = runner.invoke(app, args, terminal_width=100, prog_name="graft")
        assert res.exit_code == 0, res.output
        assert "<bool>" not in res.output and "Usage: graft" in res.output, res.output
    assert "130 interrupted (Ctrl-C), 143" in " ".join(runner.invoke(app, ["run", "--help"], prog_name="graft").output.split())
