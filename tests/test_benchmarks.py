"""The benchmark commands: cost counts against XLA's, result rows, per-layer tables, MFU and CLI errors.

All of it runs on small models (LeNet-5, the 32x32 AlexNet) or with abstract shapes, so the file takes
seconds, not minutes: the measurements themselves live in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import (common, costs, cpu_kernels, exports, flops, nnx, peers, profile, step_variants, throughput,
                        vs_torch)
from flaxnets.analysis import abstract_variables, count_params, trace_layers
from test_export import read_only_folder  # noqa: F401 - a fixture


def _xla_flops(module, input_shape) -> float:
    images = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), images)
    return float(jax.jit(module.apply).lower(variables, images).cost_analysis()["flops"])


@pytest.mark.parametrize("size,kernel,stride,pad,expected", [(8, 3, 1, 1, 22), (8, 3, 2, 1, 11), (28, 5, 1, 2, 134),
                                                             (10, 3, 1, 0, 24)])
def test_valid_taps_counts_only_taps_inside_the_input(size, kernel, stride, pad, expected):
    out = (size + 2 * pad - kernel) // stride + 1
    assert costs.valid_taps(size, out, kernel, stride, pad) == expected


@pytest.mark.parametrize("arch,shape", [("lenet5", (2, 28, 28, 1)), ("alexnet_small", (1, 32, 32, 3)),
                                        ("resnet18_cifar", (1, 8, 8, 3)), ("resnext29_8x64d", (1, 4, 4, 3))])
def test_analytic_macs_equal_xla_for_every_conv_and_dense_layer(arch, shape):
    """XLA's flops of each convolution and dense layer, lowered alone, are 2 * valid MACs + bias adds."""
    rows, _, _ = trace_layers(arch, shape)
    table = {c.path: c for c in costs.layer_costs(arch, shape)}
    checked = 0
    for row in rows:
        if row.kind not in ("Conv", "Dense"):
            continue
        cost = table[row.path]
        assert _xla_flops(row.module.clone(parent=None), row.input_shape) == 2 * cost.macs_valid + cost.bias_adds
        assert cost.macs >= cost.macs_valid > 0
        checked += 1
    assert checked >= 3


def test_whole_model_xla_count_is_analytic_plus_elementwise_work():
    row = flops.flops_row("lenet5")
    assert row["params"] == 61_706
    assert 0 <= row["elementwise_gflops"] < 0.1 * row["xla_gmacs"] * 2


NEWER = ["inception_v3", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2",
         "wide_resnet101_2", "densenet121", "densenet161", "densenet169", "densenet201", "squeezenet1_0",
         "squeezenet1_1"]


@pytest.mark.parametrize("arch", ["resnet18", "googlenet", "alexnet", *NEWER])
def test_analytic_count_matches_torchvision_within_one_percent(arch):
    row = flops.flops_row(arch)
    assert row["params"] == row["torchvision_params"]
    assert abs(row["gmacs_vs_torchvision_pct"]) < 1.0
    # XLA leaves out the padding taps; with them added back it agrees too, but for the elementwise work XLA
    # also counts: DenseNet's BatchNorm and ReLU before every convolution come to 1.2% of its MACs, and
    # SqueezeNet's bias and ReLU after each of its small convolutions to as much.
    assert abs(row["xla_plus_padding_vs_torchvision_pct"]) < (1.5 if arch.startswith(("densenet", "squeezenet"))
                                                              else 1.0)


def test_per_layer_table_sums_to_the_totals():
    rows = profile.profile_rows("alexnet_small", batch=2)
    model_params = count_params(abstract_variables("alexnet_small")["params"])
    assert sum(r["params"] for r in rows) == model_params
    whole = costs.totals(costs.layer_costs("alexnet_small", (2, 32, 32, 3)))
    assert sum(r["macs"] for r in rows) == whole["macs"]
    for key in ("params_pct", "macs_pct", "activation_pct"):
        assert sum(r[key] for r in rows) == pytest.approx(100.0, abs=0.05 * len(rows))
    kinds = {k["kind"]: k for k in profile.by_kind(rows)}
    assert kinds["Conv"]["macs"] + kinds["Dense"]["macs"] == whole["macs"]
    memory = profile.memory_estimate(rows)
    assert memory["weight_bytes"] == model_params * 4
    assert memory["weight_bytes"] < memory["predict_bytes"] < memory["train_bytes"]


def test_alexnet_weights_sit_in_the_dense_layers_and_work_in_the_convolutions():
    kinds = {k["kind"]: k for k in profile.by_kind(profile.profile_rows("alexnet"))}
    assert kinds["Dense"]["params_pct"] > 90 and kinds["Conv"]["macs_pct"] > 90


def test_mfu_arithmetic():
    assert common.mfu(4e12, 2.0, 4.0) == pytest.approx(0.5)  # 2 TFLOP/s achieved of 4
    assert common.mfu(4e12, 2.0, 1.0, devices=4) == pytest.approx(0.5)
    assert common.mfu(1e12, 1.0, None) is None
    assert common.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(989.4)
    assert common.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == pytest.approx(756.0)
    assert common.peak_tflops("NVIDIA A100-SXM4-40GB", "float32") == pytest.approx(156.0)
    assert common.peak_tflops("TPU v5 lite", "bfloat16") == pytest.approx(197.0)
    assert common.peak_tflops("cpu", "float32") is None
    assert throughput.model_flops("lenet5", "train", 4) == 3 * throughput.model_flops("lenet5", "infer", 4)


def test_timing_reports_median_and_spread():
    timing = common.Timing((3.0, 1.0, 2.0))
    assert (timing.median, timing.min, timing.max, timing.repeats) == (2.0, 1.0, 3.0, 3)


def test_lenet5_throughput_row_is_well_formed(tmp_path):
    row = throughput.throughput_row("lenet5", "infer", 8, repeats=1, warmup=1, peak=1.0, log=lambda *_: None)
    assert (row["arch"], row["mode"], row["batch"], row["size"], row["dtype"]) == ("lenet5", "infer", 8, 28, "float32")
    assert row["ms_min"] <= row["ms_per_step"] <= row["ms_max"] and row["ms_per_step"] > 0
    # Both rounded in the row (ms to the microsecond): equal within what the rounding of a short step allows.
    ms = row["ms_per_step"]
    assert 8e3 / (ms + 5e-4) - 0.01 <= row["images_per_s"] <= 8e3 / max(ms - 5e-4, 1e-9) + 0.01
    assert row["compile_s"] > 0 and row["memory_bytes"] > 0 and row["peak_rss_bytes"] > 0
    assert row["mfu"] == pytest.approx(row["tflops"] / 1.0, rel=1e-2, abs=1e-4)
    assert row["xla_gflops_per_step"] > 0
    json_path, csv_path = common.write_results("lenet", [row], {"device": "cpu"}, folder=tmp_path)
    assert json.loads(json_path.read_text())["rows"][0]["arch"] == "lenet5"
    [parsed] = list(csv.DictReader(csv_path.open()))
    assert parsed["device"] == "cpu" and float(parsed["images_per_s"]) == row["images_per_s"]


def test_cpu_kernel_variants_are_timed_side_by_side():
    rows = cpu_kernels.compare_variants("lenet5_bn", 4, None, repeats=2, warmup=0, log=lambda *_: None)
    assert [row["variant"] for row in rows] == list(cpu_kernels.VARIANTS)
    assert all(row["ms_min"] <= row["ms"] <= row["ms_max"] and row["repeats"] == 2 for row in rows)
    assert next(row for row in rows if row["variant"] == "cpu")["cpu_speedup"] == 1.0


@pytest.mark.parametrize("module,argv,needle", [
    (cpu_kernels, ["--arch", "lenet5", "--batch", "0"], "--batch"),
    (cpu_kernels, ["--arch", "lenet5,,alexnet"], "has an empty one"),
    (throughput, ["--arch", "lenet5", "--kernels", "plain", "--batch", "0"], "--batch"),
    (throughput, ["--arch", "resnet5O"], "unknown model"),
    (vs_torch, ["--arch", "resnet18", "--batch", str(2**24 + 1)], "--batch must be a whole number from 1 to 16,777,216"),
    (nnx, ["--batch", "0"], "--batch must be a whole number from 1 to"),
    (nnx, ["--repeats", "0"], "--repeats must be a positive integer, got 0"),
    (throughput, ["--arch", "lenet5", "--batch", "0"], "--batch"),
    (throughput, ["--arch", "lenet5", "--devices", "999"], "--devices"),
    (throughput, ["--arch", "lenet5", "--peak-tflops", "nan"], "--peak-tflops must be a finite number above 0"),
    (throughput, ["--arch", "lenet5", "--peak-tflops", "inf"], "--peak-tflops must be a finite number above 0"),
    (throughput, ["--arch", "lenet5", "--all"], "--all measures every architecture"),
    (throughput, ["--arch", ","], "has an empty one"),
    (throughput, ["--arch", "lenet5,,lenet5_bn"], "has an empty one"),
    (exports, ["--arch", "lenet5_bn:-3"], "'lenet5_bn:-3'"),
    (exports, ["--arch", "lenet5_bn:0"], "at least 12, lenet5_bn's minimum input"),
    (exports, ["--arch", "lenet5_bn:abc"], "'lenet5_bn:abc'"),
    (exports, ["--arch", "lenet5_bn:11"], "'lenet5_bn:11'"),
    (exports, ["--arch", "lenet5_bn:"], "'lenet5_bn:'"),
    (exports, ["--arch", ","], "has an empty one"),
    (exports, ["--arch", "lenet5_bn:28,lenet6"], "unknown model 'lenet6'"),
    (flops, ["--arch", "nothing*"], "no architecture"),
    (profile, ["--arch", "alexnet", "--size", "8"], "minimum input"),
    (vs_torch, ["--arch", "lenet5"], "torchvision has no lenet5"),
    (peers, ["--arch", "resnet18", "--peers", "flaxnets,jax"], "unknown peer"),
    (peers, ["--arch", "resnet18", "--steps", "0"], "--steps"),
    (peers, ["--arch", "resnet18", "--peers", ","], "--peers takes comma-separated names"),
    (vs_torch, ["--arch", "resnet18,"], "has an empty one"),
    (step_variants, ["--arch", "vgg11"], "ResNet-family"),
    (step_variants, ["--variant", "library:fast"], "unknown kernel set"),
    (step_variants, ["--arch", "resnet20", "--repeats", "0"], "--repeats must be a positive integer, got 0"),
    (step_variants, ["--arch", "resnet20", "--steps", "-1"], "--steps must be a positive integer, got -1"),
    (vs_torch, ["--arch", "resnet18", "--warmup", "-1"], "--warmup must be 0 or more, got -1"),
])
def test_bad_arguments_get_one_sentence_and_exit_2(module, argv, needle, capsys, monkeypatch):
    for measured in ("measure", "export_one"):  # refused before anything is timed or exported
        if hasattr(module, measured):
            monkeypatch.setattr(module, measured, lambda *args, name=measured, **kwargs: pytest.fail(f"{name} ran"))
    assert module.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and needle in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert module is not exports or captured.out == ""  # not even the table's header


@pytest.mark.parametrize("module,argv", [(throughput, ["--arch", "lenet5_bn"]), (flops, ["--arch", "lenet5_bn"]),
                                         (profile, ["--arch", "lenet5_bn"]), (peers, ["--arch", "lenet5_bn"]),
                                         (vs_torch, ["--arch", "resnet18"]), (cpu_kernels, ["--arch", "lenet5_bn"])])
def test_an_out_where_no_results_can_be_written_is_refused_before_measuring(module, argv, tmp_path, read_only_folder,
                                                                             capsys):
    (tmp_path / "afile").write_text("mine\n")
    for out, words in ((tmp_path / "afile", "afile is not a folder"),
                       (tmp_path / "afile" / "sub", "afile is not a folder"),
                       (read_only_folder / "results", "no file can be made in"), ("", "name the folder")):
        with pytest.raises(SystemExit) as refused:  # while the arguments are read: nothing has run yet
            module.main([*argv, "--out", str(out)])
        err = capsys.readouterr().err
        assert refused.value.code == 2 and err.startswith("error: argument --out: ") and words in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "mine\n"


def test_results_that_cannot_be_written_are_one_sentence_and_leave_no_partial_file(tmp_path):
    (tmp_path / "lenet.json").mkdir()  # in the way of the file
    with pytest.raises(common.BenchmarkError, match="cannot write .*lenet.json"):
        common.write_results("lenet", [{"arch": "lenet5"}], {"device": "cpu"}, folder=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["lenet.json"]


def test_vs_torch_keeps_the_maths_of_torchvision():
    torch, torchvision, reason = vs_torch.load_torch()
    if reason:
        pytest.skip(reason)
    row = vs_torch.compare("resnet18", "infer", 2, 32, repeats=3, warmup=0, log=lambda *_: None)
    assert row["rel_err"] < 1e-4
    # The times are rounded to 0.1 ms in the row, the speed is not: equal within that rounding.
    t, f = row["torch_ms"], row["flax_ms"]
    assert t > 0 and f > 0 and (t - 0.05) / (f + 0.05) - 5e-4 <= row["speed"] <= (t + 0.05) / max(f - 0.05, 1e-9) + 5e-4
    assert 0 < row["speed_pairs_min"] <= row["speed_pairs_median"] <= row["speed_pairs_max"]



def test_peers_side_by_side_at_toy_size(tmp_path, capsys):
    """flaxnets, the plain Flax model and eager torchvision train side by side in one process; a peer that
    has no such architecture (torchvision's LeNet-5) is skipped with the reason; the table's last column
    is flaxnets' speed over each, and the JSON holds the conditions."""
    assert peers.main(["--arch", "lenet5", "--batch", "4", "--steps", "1", "--repeats", "2", "--warmup", "1",
                       "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "peers_lenet5_b4_bfloat16.json").read_text())
    rows = {row["peer"]: row for row in results["rows"]}
    assert list(rows) == list(peers.PEERS)
    assert "torchvision has no lenet5" in rows["torch"]["skipped"] and "skipped" in rows["torch.compile"]
    for row in (rows["flaxnets"], rows["flax"]):
        assert 0 < row["images_per_s_min"] <= row["images_per_s"] <= row["images_per_s_max"]
        assert row["speed"] == round(rows["flaxnets"]["images_per_s"] / row["images_per_s"], 3)
        assert row["memory_mib"] is not None and row["compile_s"] > 0
    assert results["conditions"]["command"].startswith("python -m benchmarks.peers")
    assert "| flaxnets speed |" in capsys.readouterr().out


def test_torchvision_peer_trains_eagerly():
    if vs_torch.load_torch()[2]:
        pytest.skip(vs_torch.load_torch()[2])
    prepared = peers.prepare("torch", "resnet18", 2, 16, "float32")
    row = peers.time_peer(prepared, 2, steps=1, repeats=1, warmup=1)
    assert row["images_per_s"] > 0 and row["compile_s"] is None  # eager: nothing compiled, no figure made up


def test_a_throughput_rows_peak_memory_is_its_own():
    """The peak resident set size starts afresh for each row where Linux allows, so a row measured after a
    larger one does not carry the larger one's peak."""
    if not common.reset_peak_rss():
        pytest.skip("this system cannot reset the peak resident set size")
    before = common.peak_rss_bytes()
    block = np.ones(2**27 // 8)  # 128 MiB, touched
    assert common.peak_rss_bytes() >= before + 100 * 2**20
    del block
    assert common.reset_peak_rss() and common.peak_rss_bytes() < before + 100 * 2**20
    row = throughput.throughput_row("lenet5", "infer", 2, repeats=1, warmup=0, log=lambda *_: None)
    assert row["peak_rss_of"] == "this row" and row["peak_rss_bytes"] > 0
    assert row["model_gflops_per_step"] == pytest.approx(2 * 416_520 * 2 / 1e9, rel=1e-5)  # not rounded to 0.002


def flaxnets_plain():
    from flaxnets.layers import PLAIN

    return PLAIN


def test_step_settings_reach_the_benchmark_step_and_the_trainer_drivers():
    """`train.tuning`'s settings are the options of the compiled step: an unknown XLA option fails to
    compile in both places, a known one and a matmul precision give the plain step's numbers."""
    from train.parallel import make_driver
    from train.tuning import CPU_SETTINGS, GPU_SETTINGS, StepSettings, step_settings

    assert step_settings("cpu") is CPU_SETTINGS and step_settings("gpu") is GPU_SETTINGS
    assert step_settings("tpu") == StepSettings() and StepSettings().ops() is flaxnets_plain()
    bad = StepSettings(compiler_options={"xla_no_such_option": 1})
    with pytest.raises(Exception, match="xla_no_such_option"):
        common.build_step("lenet5", "infer", 2, settings=bad)
    plain = common.build_step("lenet5", "infer", 2, settings=StepSettings())
    tuned = common.build_step("lenet5", "infer", 2, settings=StepSettings({"xla_cpu_enable_fast_math": False}, "highest"))
    np.testing.assert_allclose(tuned.compiled(*tuned.args), plain.compiled(*plain.args), rtol=1e-6)
    driver = make_driver("shard_map", lambda state, batch, axis_name: (state, {}),
                         lambda state, batch, axis_name: {}, settings=bad)
    data = driver.put_replicated({"image": np.zeros((8, 4, 4, 1), np.uint8), "label": np.zeros(8, np.int32)})
    with pytest.raises(Exception, match="xla_no_such_option"):
        driver.train({"w": jnp.zeros(())}, data, driver.put_indices(np.arange(8)))


def test_without_out_a_benchmark_prints_and_leaves_the_committed_results_alone(tmp_path, monkeypatch, capsys):
    committed = Path(common.__file__).parent / "results"
    before = {path: path.stat().st_mtime_ns for path in committed.iterdir()}
    monkeypatch.chdir(tmp_path)
    assert flops.main(["--arch", "lenet5"]) == 0
    assert "| lenet5 |" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in committed.iterdir()} == before
    assert list(tmp_path.iterdir()) == []


def test_flops_of_a_subset_writes_its_own_file_and_keeps_the_whole_table(tmp_path, capsys):
    (tmp_path / "flops.json").write_text("the table of every architecture\n")
    assert flops.main(["--arch", "lenet5*", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "flops.json").read_text() == "the table of every architecture\n"
    written = json.loads((tmp_path / "flops_lenet5.json").read_text())
    assert {row["arch"] for row in written["rows"]} == {"lenet5", "lenet5_bn", "lenet5_relu"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flops.json", "flops_lenet5.csv", "flops_lenet5.json"]


def test_every_kernel_set_the_tune_step_names_exists_and_pools_like_the_library():
    """Each kernel set a `benchmarks.gpu.tune` variant names is one of `step_variants.kernel_sets()`, and
    its max pooling gives the plain layer's values (the sets differ in how, not in what, they compute)."""
    from benchmarks.gpu.tune import VARIANTS
    from flaxnets.layers import PLAIN

    sets = step_variants.kernel_sets()
    assert {v.kernels for v in VARIANTS} - {"default"} <= set(sets)
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    pool = dict(window=3, stride=2, padding=1)
    expected, _ = PLAIN.max_pool(**pool).init_with_output(jax.random.key(0), x)
    for name, ops in sets.items():
        got, _ = ops.max_pool(**pool).init_with_output(jax.random.key(0), x)
        np.testing.assert_array_equal(got, expected, err_msg=name)
