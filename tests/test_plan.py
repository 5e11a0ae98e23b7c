"""clipjax.plan: the real train step compiled for a TPU topology and for NVIDIA GPUs, with no
device here (JAX's accelerator plugins from requirements-compile.txt); the batch search; the
reading of compiled programs; and the one-line errors."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from clipjax import plan, sharding
from clipjax.errors import ConfigError
from clipjax.plan import hlo, targets
from tests.tiny import tiny_config

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed: pip install -r requirements-compile.txt"
)
needs_cuda_plugin = pytest.mark.skipif(
    not HAS_CUDA_PLUGIN,
    reason="JAX's CUDA plugin is not installed: pip install -r requirements-compile.txt",
)


def _tiny_bfloat16():
    config = tiny_config("clip_vitb32")
    config.model.dtype = "bfloat16"
    return config


@pytest.fixture(scope="module")
def tpu_compiled():
    target = targets.resolve("v5e:2x2")
    return plan.compile_step(_tiny_bfloat16(), target), target


@pytest.fixture(scope="module")
def tpu_report(tpu_compiled):
    return plan.report(*tpu_compiled)


@pytest.fixture(scope="module")
def gpu_report():
    target = targets.resolve("h100x2")
    return plan.report(plan.compile_step(_tiny_bfloat16(), target), target)


@needs_libtpu
def test_the_tiny_config_compiles_for_v5e_and_fits(tpu_report):
    r = tpu_report
    assert (r["chip"], r["devices"], r["data_parallel"]) == ("TPU v5 lite", 4, 4)
    assert r["fits"] and 0 < r["memory_bytes"]["peak"] < r["device_memory_bytes"]
    terms = r["memory_bytes"]
    want_peak = terms["arguments"] + terms["outputs"] - terms["aliased"] + terms["temporaries"]
    assert terms["peak"] == want_peak
    # The contrastive loss gathers every device's embeddings; the gradients are reduced.
    assert r["collectives"]["all-gather"]["count"] >= 1
    assert r["collectives"]["all-reduce"]["count"] >= 1
    assert r["attention"] == "xla" and r["flops_source"] == "compiled"
    assert r["flops_per_example"] > 0 and r["rematerialisations"] == 0


@needs_libtpu
def test_a_config_that_does_not_fit_names_its_largest_term_and_the_fields_that_help(
    tpu_compiled,
):
    compiled, target = tpu_compiled
    small = dataclasses.replace(target, memory_bytes=1 << 20)  # a chip of 1 MiB
    r = plan.report(compiled, small)
    terms = r["memory_bytes"]
    assert not r["fits"] and terms["peak"] > small.memory_bytes
    largest = max(("arguments", "outputs", "temporaries"), key=terms.get)
    assert (r["dominant"], r["remedy"]) == (largest, plan.REMEDIES[largest])
    assert "config.mesh.fsdp" in plan.REMEDIES["arguments"]
    assert "config.accum_steps" in plan.REMEDIES["temporaries"]


@needs_cuda_plugin
def test_the_tiny_config_compiles_for_two_h100s_with_fused_attention(gpu_report):
    r = gpu_report
    assert (r["chip"], r["devices"]) == ("NVIDIA H100 80GB HBM3", 2)
    assert r["fits"] and r["attention"] == "cudnn"
    assert r["collectives"]["all-gather"]["count"] >= 1
    reduces = sum(r["collectives"].get(op, {}).get("count", 0) for op in plan.GRADIENT_REDUCES)
    assert reduces >= 1
    # One fused forward and one fused backward per attention layer: the 16-px image tower's
    # 5 tokens and the text tower's 16, padded to multiples of 8.
    config = _tiny_bfloat16()
    for tower, depth in (("image_tower", config.model.image.depth), ("text_tower", 1)):
        assert r["fused_attention_calls"][tower] == {"forward": depth, "backward": depth}


def test_auto_attention_follows_the_mesh_not_the_default_backend():
    """A mesh of (stand-in) GPU devices gets cuDNN with 16-bit operands, whatever backend runs
    this process; a CPU mesh and float32 get XLA's."""
    from clipjax import step

    class Device:
        platform = "gpu"

    class Mesh:
        devices = __import__("numpy").array([Device()])

    config = _tiny_bfloat16()
    assert step.attention_for_mesh(config, Mesh()).model.attention == "cudnn"
    assert config.model.attention == "auto"  # the caller's config is left as it was
    config.model.dtype = "float32"
    assert step.attention_for_mesh(config, Mesh()).model.attention == "xla"
    cpu_mesh = sharding.make_mesh(config.mesh)
    assert step.attention_for_mesh(_tiny_bfloat16(), cpu_mesh).model.attention == "xla"


def test_largest_batch_finds_the_largest_fitting_multiple_of_the_data_parallel_size(monkeypatch):
    """Against stand-in compiles whose peak memory is known: the search lands on the largest
    multiple of the unit that fits, from above or below; a near-linear peak takes a few
    compiles, a step in memory (where the line misleads) still ends in the exact bracket."""
    compiled = []
    unit = 8  # the 8 data-parallel test devices
    arguments = 1000

    def fake_compile(config, target):
        compiled.append(config.batch_size)
        return config.batch_size

    target = targets.Target("fake", "cpu", "CPU", 100_000, tuple(__import__("jax").devices()))
    config = tiny_config("clip_vitb32")
    monkeypatch.setattr(plan, "compile_step", fake_compile)
    smooth = lambda b: arguments + 37 * b + b * b // 4000  # noqa: E731 - activations, gathered logits
    stepped = lambda b: arguments + (10 * b if b <= 1000 else 10**6)  # noqa: E731
    for peak, most_compiles in ((smooth, 5), (stepped, 20)):
        monkeypatch.setattr(
            plan, "memory", lambda b, peak=peak: {"arguments": arguments, "peak": peak(b)}
        )
        # The reference: every multiple of the unit tried.
        largest = max(b for b in range(unit, 10**5, unit) if peak(b) <= target.memory_bytes)
        for start in (16, 4096):
            config.batch_size, compiled[:] = start, []
            fits, fails, spent = plan.largest_batch(config, target, 10**6, max_compiles=20)
            assert (fits, fails) == (largest, largest + unit)
            assert spent == len(compiled) == len(set(compiled)) and spent <= most_compiles
            assert all(batch % unit == 0 for batch in compiled)
    # One compile's estimate is exact where the peak is linear in the batch.
    linear = lambda b: arguments + 37 * b  # noqa: E731
    largest = max(b for b in range(unit, 10**5, unit) if linear(b) <= target.memory_bytes)
    terms = {"arguments": arguments, "peak": linear(48)}
    assert plan.estimated_largest_batch(terms, 48, unit, target.memory_bytes) == largest
    config.batch_size = 16
    fits, fails, spent = plan.largest_batch(config, target, 10**6, max_compiles=3)
    assert spent == 3 and fits < 1000 < fails  # a bracket, when the compiles run out
    fits, fails, _ = plan.largest_batch(config, target, 512, max_compiles=20)
    assert (fits, fails) == (512, None)  # everything up to --max_batch fits


HLO = """
  %all-gather-start = (bf16[4,16]{1,0}, bf16[16,16]{1,0}) all-gather-start(%fusion.1), dimensions={0}
  %all-gather-done = bf16[16,16]{1,0} all-gather-done(%all-gather-start)
  %all-reduce.3 = (f32[128,64]{1,0}, f32[64]{0}) all-reduce(%a, %b), to_apply=%add
  %collective-permute-start.2 = (f32[8,32]{1,0}, f32[8,32]{1,0}, u32[], u32[]) collective-permute-start(%x)
  %fusion.7.remat = f32[8]{0} fusion(%y), kind=kLoop
  %fusion.9.remat2 = f32[8]{0} fusion(%y), kind=kLoop
  %cc.1 = (bf16[2,8,4,64]{3,2,1,0}, f32[2,4,8]{2,1,0}) custom-call(%q), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(train_step)/image_tower/transformer/block_00/attn/dot_product_attention"}
  %cc.2 = (bf16[2,8,4,64]{3,2,1,0}) custom-call(%q), custom_call_target="__cudnn$fmhaSoftmaxBackward", metadata={op_name="jit(train_step)/transpose(jvp(text_tower))/block_00/attn"}
"""  # noqa: E501 - compiled HLO's lines, as XLA writes them


def test_the_compiled_program_is_read_for_collectives_remat_and_fused_calls():
    assert hlo.collectives(HLO) == {
        "all-gather": {"count": 1, "bytes": 16 * 16 * 2},  # the gathered array
        "all-reduce": {"count": 1, "bytes": (128 * 64 + 64) * 4},
        "collective-permute": {"count": 1, "bytes": 8 * 32 * 4},  # the received chunk
    }
    assert hlo.rematerialisations(HLO) == 2
    assert hlo.fused_attention(HLO) == {
        "image_tower": {"forward": 1, "backward": 0},
        "text_tower": {"forward": 0, "backward": 1},
    }


def test_an_unknown_target_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"--target='tpu9' is unknown; use one of TPU .*h100xN"):
        targets.resolve("tpu9")


def test_a_missing_plugin_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="needs libtpu: pip install -r requirements-compile"):
        targets.resolve("v5e:2x2")
    with pytest.raises(ConfigError, match="needs JAX's CUDA plugin: pip install -r requirements"):
        targets.resolve("h100x8")


@needs_libtpu
def test_the_command_prints_a_table_and_json_and_refuses_a_mesh_that_does_not_fit(tmp_path):
    base = [sys.executable, "-m", "clipjax.plan", "--config=tests/configs/tiny.py"]
    env = {**os.environ, "XLA_FLAGS": ""}  # the plan needs no fake CPU devices
    done = subprocess.run(
        [*base, "--target=v5e:2x2"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("tests/configs/tiny.py on v5e:2x2: 4 × TPU v5 lite")
    assert any("peak per device" in line and ": fits" in line for line in lines)
    result = json.loads(lines[-1])
    assert result["targets"][0]["fits"] and result["targets"][0]["batch_size"] == 16
    done = subprocess.run(
        [*base, "--target=v5e:2x2", "--config.mesh.data=3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("clipjax.plan: config.mesh: ")


@needs_cuda_plugin
@pytest.mark.slow
@pytest.mark.parametrize(
    "config_name,variant",
    [("clip_vitb32", "B/32"), ("siglip_vitb16", "B/16"), ("clip_vitb32", "L/14")],
)
def test_full_size_towers_get_one_fused_call_per_layer_and_direction_on_h100(config_name, variant):
    """The full-size towers in bfloat16 on two H100s (a batch of 16: the program's calls do not
    depend on it): one cuDNN forward and one backward per attention layer of both towers, at
    every length the image tower has (50, 197, 257 tokens) and the text tower's 77 or 64."""
    import importlib

    config = importlib.import_module(f"configs.{config_name}").get_config()
    config.batch_size, config.model.dtype = 16, "bfloat16"
    config.model.image.variant = variant
    target = targets.resolve("h100x2")
    result = plan.report(plan.compile_step(config, target), target)
    image_depth = {"B/32": 12, "B/16": 12, "L/14": 24}[variant]
    calls = result["fused_attention_calls"]
    assert calls["image_tower"] == {"forward": image_depth, "backward": image_depth}
    depth = config.model.text.depth
    assert calls["text_tower"] == {"forward": depth, "backward": depth}
