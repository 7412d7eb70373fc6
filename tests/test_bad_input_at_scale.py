"""Bad input at scale (issue 20): a source cut short mid-row, a disk that fills up during the
build. Each stops the build with one line that names the file, and leaves the previous output as
it was. (A Parquet source with damaged pages: tests/test_out_of_core.py and tests/test_build.py.)"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from features.build import build
from recsys.errors import DataError
from recsys.schemas import BuildConfig

ROOT = Path(__file__).resolve().parents[1]
TAOBAO = "".join(f"{u},{i},{i % 7},pv,{1511544070 + 60 * i}\n" for u in range(1, 30) for i in range(1, 40))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_csv_cut_mid_row_stops_the_build_and_names_the_line(tmp_path):
    source = tmp_path / "ub.csv"
    source.write_text(TAOBAO)
    out = tmp_path / "data"
    build(f"taobao:{source}", out, BuildConfig())
    before = _files(out)
    lines = TAOBAO.count("\n")
    source.write_text(TAOBAO[: TAOBAO.rindex("\n") - 6])  # the last row loses its end
    with pytest.raises(DataError, match=rf"^ub.csv:{lines}: field 'timestamp': the file ends in the middle of a row"):
        build(f"taobao:{source}", out, BuildConfig(), overwrite=True)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "ub.csv"]


def test_a_valid_last_line_without_a_line_end_is_read(tmp_path):
    source = tmp_path / "ub.csv"
    source.write_text(TAOBAO.rstrip("\n"))
    report = build(f"taobao:{source}", tmp_path / "data", BuildConfig())
    assert report["rows_read"]["events"] == TAOBAO.count("\n") and report["rows_rejected"] == 0


def test_a_bad_last_line_with_its_line_end_is_only_rejected(tmp_path):
    source = tmp_path / "ub.csv"
    source.write_text(TAOBAO + "1,2,3,pv,15115\n")
    report = build(f"taobao:{source}", tmp_path / "data", BuildConfig())
    assert report["rows_rejected"] == 1


def _limit_file_size(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG instead of a signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("where", ["--in-memory", "--out-of-core"])
def test_a_disk_that_fills_up_stops_the_build_in_one_line_and_keeps_the_previous_output(tiny_world, tmp_path, where):
    out = tmp_path / "data"
    build(f"synth:{tiny_world}", out, BuildConfig())
    before = _files(out)
    cmd = [sys.executable, "-m", "recsys.cli", "data", "build", "--source", f"synth:{tiny_world}", "--out", str(out),
           "--overwrite", where, "--memory-gb", "0.0005"]
    # 200 kB: the history store (in memory) or the events' spill file (out of core) is larger
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, preexec_fn=_limit_file_size(200_000),
                            timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if not line.startswith("[build]")]
    assert errors == [f"recsys: error: cannot write {out}: a file would pass the file size limit (on the file "
                      f"system of {tmp_path}); the job stopped and what it held is untouched"], result.stderr
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
