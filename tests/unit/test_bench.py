"""The pure helpers of the benchmarks: percentiles and the hypervisor's steal (bench/stats.py),
and `virtfleet bench submit`'s summaries, verdicts, the breakdown from event timestamps, the
report and its table. Nothing here is timed."""

from __future__ import annotations

import json

import pytest

from bench import submit
from bench.stats import cpu_times, steal_share


def test_percentile_interpolates_between_ranks_like_numpy() -> None:
    values = [10.0, 20.0, 30.0, 40.0]
    assert submit.percentile(values, 0) == 10.0
    assert submit.percentile(values, 100) == 40.0
    assert submit.percentile(values, 50) == 25.0
    assert submit.percentile(values, 95) == pytest.approx(38.5)
    assert submit.percentile([7.0], 95) == 7.0


def test_percentile_ignores_input_order_and_leaves_it_alone() -> None:
    values = [40.0, 10.0, 30.0, 20.0]
    assert submit.percentile(values, 50) == 25.0
    assert values == [40.0, 10.0, 30.0, 20.0]


@pytest.mark.parametrize("values, q", [([], 50), ([1.0], -1), ([1.0], 101)])
def test_percentile_rejects_no_values_and_bad_q(values: list[float], q: float) -> None:
    with pytest.raises(ValueError):
        submit.percentile(values, q)


def test_summarize() -> None:
    s = submit.summarize([float(x) for x in range(21)])
    assert s == {"n": 21, "p50": 10.0, "p95": 19.0, "min": 0.0, "max": 20.0, "mean": 10.0}
    assert submit.summarize([1.0, 1.26])["p50"] == 1.1  # rounded to 0.1 ms
    assert submit.summarize([]) == {"n": 0}


def test_verdict_is_inclusive_and_knows_missing_values() -> None:
    assert submit.verdict(150.0, 150.0) == "PASS"
    assert submit.verdict(150.1, 150.0) == "FAIL"
    assert submit.verdict(None, 150.0) == "n/a"


def test_overhead_difference_ratio_and_verdict() -> None:
    o = submit.overhead({"n": 3, "p50": 900.0}, {"n": 3, "p50": 800.0}, 150.0)
    assert o == {"p50_ms": 100.0, "ratio": 1.12, "target_ms": 150.0, "verdict": "PASS",
                 "paired_p50_ms": None}
    o = submit.overhead({"n": 3, "p50": 1000.0}, {"n": 3, "p50": 800.0}, 150.0)
    assert (o["p50_ms"], o["ratio"], o["verdict"]) == (200.0, 1.25, "FAIL")
    assert submit.overhead({"n": 0}, {"n": 3, "p50": 1.0}, 150.0)["verdict"] == "n/a"
    assert submit.overhead({"n": 3, "p50": 9.0}, {"n": 3, "p50": 8.0}, 150.0,
                           paired=[3.0, 1.0, 2.0])["paired_p50_ms"] == 2.0


def test_paired_differences_stop_at_the_shorter_list() -> None:
    assert submit.paired([5.0, 7.0, 9.0], [1.0, 2.0]) == [4.0, 5.0]


def test_epoch_reads_naive_timestamps_as_utc() -> None:
    assert submit.epoch("1970-01-01T00:00:10") == 10.0
    assert submit.epoch("1970-01-01T01:00:10+01:00") == 10.0
    assert submit.epoch(None) is None


def test_milestones_from_events_takes_the_first_of_each() -> None:
    events = [
        {"type": "vm.state", "ts": "1970-01-01T00:00:01", "data": {"state": "building"}},
        {"type": "vm.build.step", "ts": "1970-01-01T00:00:02", "data": {"step": "image"}},
        {"type": "vm.build.step", "ts": "1970-01-01T00:00:03", "data": {"step": "define"}},
        {"type": "vm.lifecycle", "ts": "1970-01-01T00:00:04",
         "data": {"event": "defined", "detail": "added"}},
        {"type": "vm.lifecycle", "ts": "1970-01-01T00:00:05",
         "data": {"event": "started", "detail": "booted"}},
        {"type": "vm.build.done", "ts": "1970-01-01T00:00:06", "data": {"state": "running"}},
        {"type": "vm.build.step", "ts": "1970-01-01T00:00:07", "data": {"step": "image"}},
        {"type": "vm.state", "ts": "1970-01-01T00:00:08", "data": {"state": "deleting"}},
    ]
    assert submit.milestones_from_events(events) == {
        "building": 1.0, "image": 2.0, "define": 3.0, "started": 5.0, "done": 6.0}


def test_stage_samples_telescope_and_skip_runs_missing_a_milestone() -> None:
    names = ["send", "building", "image", "overlay", "seed", "define", "done", "applied",
             "api_running"]
    full = {name: i * 0.01 for i, name in enumerate(names)}
    partial = {k: v for k, v in full.items() if k != "seed"}
    stages = submit.stage_samples([full, partial])
    assert stages["web_place"] == pytest.approx([10.0, 10.0])
    assert stages["overlay_step"] == pytest.approx([10.0])  # overlay -> seed
    assert stages["seed_step"] == pytest.approx([10.0])
    total = sum(stages[key][0] for key, *_ in submit.STAGES)
    assert total == pytest.approx((full["api_running"] - full["send"]) * 1000)
    outside = stages["outside_define_start"]
    assert outside == pytest.approx([total - stages["define_start"][0]] * 2)
    assert stages["post_202"] == []


def _report() -> dict:
    samples = {
        "api_to_running_api": [900.0, 1000.0, 1100.0],
        "api_to_running_libvirt": [850.0, 950.0, 1050.0],
        "bare_define_start": [700.0, 800.0, 900.0],
        "bare_until_domstate": [720.0, 820.0, 920.0],
        "overlay_seed": [20.0, 30.0, 40.0],
        "overlay": [15.0, 25.0, 35.0],
        "seed": [5.0, 5.0, 5.0],
        "milestones": [{"send": 0.0, "building": 0.02, "accepted": 0.03}],
    }
    return submit.build_report(samples, runs=3, warmup=1, virt_type="qemu",
                               poll_ms={"api": 10.0, "libvirt": 5.0},
                               notes=["a note"])


def test_build_report_figures_and_targets() -> None:
    r = _report()
    assert r["api_to_running_api"]["p50"] == 1000.0
    assert r["targets"]["overhead_api"] == {"p50_ms": 200.0, "ratio": 1.25,
                                            "target_ms": 150.0, "verdict": "FAIL",
                                            "paired_p50_ms": 200.0}
    assert r["targets"]["overhead_libvirt"]["p50_ms"] == 150.0
    assert r["targets"]["overhead_libvirt"]["verdict"] == "PASS"
    assert r["targets"]["overlay_seed"] == {"p50_ms": 30.0, "target_ms": 50.0,
                                            "verdict": "PASS"}
    assert r["breakdown"]["web_place"]["p50"] == 20.0
    assert r["breakdown"]["post_202"]["p50"] == 30.0
    assert r["breakdown"]["image_step"] == {"n": 0}
    json.dumps(r)  # everything in it is JSON


def test_exit_code_only_fails_when_strict() -> None:
    r = _report()
    assert submit.exit_code(r, strict=False) == 0
    assert submit.exit_code(r, strict=True) == 1
    for t in r["targets"].values():
        t["verdict"] = "PASS"
    assert submit.exit_code(r, strict=True) == 0


def test_render_shows_every_figure_and_verdict() -> None:
    text = submit.render(_report())
    assert "API: POST -> API shows running" in text
    assert "bare: virsh define + start (wall time)" in text
    assert "1000.0" in text and "FAIL" in text and "PASS" in text
    assert "(1.25x)" in text
    assert "note: a note" in text
    assert "per run, all but define + start" in text
    for _key, label, *_ in submit.STAGES:
        assert label in text


# -- bench images: the import part's pure helpers and its file helpers -----------------------


def _import_case(ratio_plain: float) -> dict:
    from bench import images
    imports = [{"total": 1.0, "upload": 0.9, "job": 0.1, "job_inspect": 0.01,
                "job_sync": 0.02, "job_publish": 0.0, "job_seen": 0.003,
                "job_dispatch": 0.002, "job_other": 0.065} for _ in range(3)]
    return images.import_case("a case", "qcow2", "client", 1024 ** 3,
                              [(0.5, ratio_plain)] * 3, imports)


def test_bench_images_import_case_figures_and_verdict() -> None:
    case = _import_case(0.95)
    assert case["p50_s_plain_convert"] == 0.95 and case["p50_s_import"] == 1.0
    assert case["p50_s_plain_convert_unsynced"] == 0.5
    assert case["ratio"] == 0.95 and case["verdict"] == "PASS"
    assert case["job_only_ratio"] == 9.5
    assert _import_case(0.5)["verdict"] == "FAIL"


def test_bench_images_render_shows_every_import_case() -> None:
    from bench import images
    cases = {"qcow2_upload": _import_case(0.95), "raw_upload": _import_case(0.3)}
    cases["raw_upload"].update(label="sparse raw disk, uploaded", format="raw")
    report = {
        "scaling": {"runs": 1, "load": [0, 0], "p50_ms_1gib": 1, "min_ms_1gib": 1,
                    "p50_ms_1tib": 1, "min_ms_1tib": 1, "ratio": 1, "target_max": 1.1,
                    "verdict": "PASS", "first_ms": [1, 1]},
        "copy": {"base_bytes": 1, "copy_runs": 1, "load": [0, 0], "p50_s_full_copy": 1,
                 "min_s_full_copy": 1, "p50_ms_overlay_seed": 1, "min_ms_overlay_seed": 1,
                 "ratio": 100, "target_min": 100, "verdict": "PASS", "best_ratio": 100},
        "import": {"runs": 3, "load": [1.0, 2.0], "raw_bytes": 4 << 30, "data_bytes": 1 << 30,
                   "qcow2_bytes": 1 << 30, "cases": cases, "target_min": 0.9,
                   "verdict": "FAIL"},
    }
    text = images.render(report)
    assert "[qcow2_upload] a case" in text and "[raw_upload] sparse raw disk" in text
    assert "0.950" in text and "0.300" in text
    assert "met by: qcow2_upload; missed by: raw_upload (0.300)   FAIL" in text
    assert "fsync (what the upload's writeback left)" in text
    assert json.loads(json.dumps(report)) == report


def test_bench_images_an_informational_case_has_no_target() -> None:
    from bench import images
    imports = [{"total": 2.0, "upload": 1.5, "job": 0.5} for _ in range(3)]
    case = images.import_case("whole", "raw", "whole", 1 << 30, [(0.5, 1.0)] * 3, imports,
                              target=False)
    assert (case["ratio"], case["target_min"], case["verdict"]) == (0.5, None, "INFO")
    lines = "\n".join(images.render_case("raw_upload_whole", case))
    assert "no target   INFO" in lines and "POST /images/upload, whole" in lines
    keys = [k for k, *_ in images.IMPORT_CASES]
    assert keys == ["qcow2_upload", "raw_upload", "raw_path", "raw_upload_whole"]
    assert [how for _, _, how, *_ in images.IMPORT_CASES] == ["client", "client", "path",
                                                             "whole"]


@pytest.mark.skipif(__import__("shutil").which("qemu-img") is None, reason="needs qemu-img")
def test_bench_images_stamp_and_the_durable_plain_convert(tmp_path) -> None:
    from bench import images
    from fleet.proc import run
    raw, qcow2, out = tmp_path / "d.raw", tmp_path / "d.qcow2", tmp_path / "o.qcow2"
    images.make_disk(raw, 32 * 1024 ** 2, 4 * 1024 ** 2)
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], timeout=60)
    before = qcow2.read_bytes()
    images.stamp(qcow2, "qcow2", 1)
    images.stamp(raw, "raw", 1)
    after = qcow2.read_bytes()
    assert after != before and len(after) == len(before)
    run(["qemu-img", "check", "-f", "qcow2", str(qcow2)], timeout=60)
    # The same 16 bytes land at the disk's offset 16 in both: the two still hold one disk.
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(qcow2)], timeout=60)
    convert, total = images.plain_convert(qcow2, "qcow2", out)
    assert 0 < convert <= total
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(qcow2), str(out)],
        timeout=60)


def test_bench_images_quiet_can_drop_the_stores_files(tmp_path) -> None:
    from bench import images
    (tmp_path / "imports").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / ("ab" * 32)).write_bytes(b"x")
    images.quiet(tmp_path)
    assert (tmp_path / "images" / ("ab" * 32)).exists()
    images.quiet(tmp_path, drop_images=True)
    assert list((tmp_path / "images").iterdir()) == []


def test_steal_is_the_share_of_the_machines_cpu_time_between_two_readings(tmp_path) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 0 50 800 10 0 5 35 7 0\ncpu0 50 0 25 400 5 0 2 18 3 0\n")
    before = cpu_times(str(stat))
    assert before == (35, 1000)  # guest time is inside user already: not counted twice
    stat.write_text("cpu  160 0 80 1500 10 0 10 235 9 0\n")
    after = cpu_times(str(stat))
    assert after == (235, 1995)
    assert steal_share(before, after) == pytest.approx(200 / 995)
    assert steal_share(after, after) is None and steal_share(None, after) is None
    assert cpu_times(str(tmp_path / "none")) is None
    stat.write_text("intr 1 2 3\n")
    assert cpu_times(str(stat)) is None

