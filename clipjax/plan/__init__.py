"""Will a config fit, at which batch, on which chips? The real train step, compiled for a
target's abstract devices (`targets`), with nothing allocated and no device present.

`compile_step` builds the state and the step exactly as the trainer does (`step.build`, on
`sharding.make_mesh(config.mesh, target.devices)`) and compiles them for the batch the
trainer feeds. `report` reads the compiled program: memory per device, fit, flops per
example, collectives, the attention kernel each tower got and XLA's rematerialisations.
`largest_batch` searches the multiples of the data-parallel size, interpolating the peak
memory between compiles; `estimated_largest_batch` guesses from one. Figures are compiled, not
run: memory and flops are exact for the program XLA built, not a measurement of a device.
"""

import dataclasses
import time

import flax.linen as nn
import jax
import jax.extend

from clipjax import sharding, step
from clipjax.errors import ConfigError
from clipjax.plan import hlo
from clipjax.plan.targets import Target

# The collectives that sum gradients over the data-parallel devices.
GRADIENT_REDUCES = ("all-reduce", "reduce-scatter")
# No GPU is here to autotune Triton's GEMMs: cuBLAS calls, as XLA's untuned fallback.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}

# What helps each term of the peak when a config does not fit.
REMEDIES = {
    "arguments": "shard the parameters and optimizer state: config.mesh.fsdp (with "
    "config.mesh.data=-1)",
    "temporaries": "keep fewer activations: config.model.remat='full' or 'dots', "
    "config.accum_steps=K, config.model.scan_layers=True",
    "outputs": "shard the state: config.mesh.fsdp",
}


@dataclasses.dataclass
class Compiled:
    """A train step compiled for a target: the executable and what it took."""

    executable: object  # jax.stages.Compiled
    lowered: object  # jax.stages.Lowered
    batch_size: int
    devices: int
    data_parallel: int
    unit: int  # batches split over the mesh in multiples of this: data-parallel × accum_steps
    params: int
    attention: str  # model.attention as build resolved it for the target
    compile_s: float


def with_batch(config, batch_size: int):
    """A copy of `config` at global batch `batch_size`."""
    config = config.copy_and_resolve_references()
    config.batch_size = batch_size
    return config


def compile_step(config, target: Target) -> Compiled:
    """`config`'s train step lowered and compiled for `target`'s devices: ConfigError if the
    mesh does not fit them or the batch does not split over it."""
    mesh = sharding.make_mesh(config.mesh, list(target.devices))
    data_parallel = sharding.data_parallel_size(mesh)
    per_device, remainder = divmod(config.batch_size, data_parallel)
    if remainder or per_device % config.accum_steps:
        raise ConfigError(
            f"config.batch_size={config.batch_size} does not split over {target.name}'s "
            f"{data_parallel} data-parallel devices into micro-batches of config.accum_steps="
            f"{config.accum_steps}; use a multiple of {data_parallel * config.accum_steps}."
        )
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        objective, _, abstract_state, step_fn = step.build(config, mesh)
        batch = step.abstract_batch(config, mesh, objective.views)
        start = time.perf_counter()
        lowered = step_fn.lower(abstract_state, batch)
        executable = lowered.compile(GPU_COMPILER_OPTIONS if target.platform == "cuda" else None)
        seconds = time.perf_counter() - start
    return Compiled(
        executable=executable,
        lowered=lowered,
        batch_size=config.batch_size,
        devices=len(target.devices),
        data_parallel=data_parallel,
        unit=data_parallel * config.accum_steps,
        params=sum(x.size for x in jax.tree.leaves(abstract_state.params)),
        attention=step.attention_for_mesh(config, mesh).model.attention,
        compile_s=seconds,
    )


def memory(compiled: Compiled) -> dict[str, int]:
    """Bytes per device: arguments, outputs, aliased (outputs written over donated
    arguments), temporaries, and the peak arguments + outputs - aliased + temporaries."""
    analysis = compiled.executable.memory_analysis()
    terms = {
        "arguments": analysis.argument_size_in_bytes,
        "outputs": analysis.output_size_in_bytes,
        "aliased": analysis.alias_size_in_bytes,
        "temporaries": analysis.temp_size_in_bytes,
    }
    terms["peak"] = terms["arguments"] + terms["outputs"] - terms["aliased"] + terms["temporaries"]
    return terms


def fits(compiled: Compiled, target: Target) -> bool:
    return memory(compiled)["peak"] <= target.memory_bytes


def flops_per_device(compiled: Compiled) -> tuple[float | None, str]:
    """XLA's flop count of one device's program, and where it comes from. A TPU executable
    counts its own (partitioned, rematerialisations included). A GPU executable has no cost
    analysis: there it is the lowered (whole, unpartitioned) program's count over the devices,
    in which cuDNN's attention calls count as zero."""
    cost = compiled.executable.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    if cost and cost.get("flops", -1) > 0:
        return float(cost["flops"]), "compiled"
    try:
        # What `Lowered.cost_analysis` calls, run by the CPU client: the lowering's own
        # backend is a GPU plugin without a device. No public form takes another backend.
        from jax._src.lib import _jax

        module = compiled.lowered.compiler_ir("hlo").as_hlo_module()
        cost = _jax.hlo_module_cost_analysis(jax.extend.backend.get_backend("cpu"), module)
    except Exception:  # noqa: BLE001 - an optional figure: any failure leaves it out
        return None, "unavailable"
    return float(cost["flops"]) / compiled.devices, "lowered, cuDNN attention not counted"


def report(compiled: Compiled, target: Target) -> dict:
    """What `clipjax.plan` prints for one compile, as a dict (sizes in bytes)."""
    text = compiled.executable.as_text()
    terms = memory(compiled)
    flops, flops_source = flops_per_device(compiled)
    devices = len(target.devices)
    result = {
        "target": target.name,
        "chip": target.chip,
        "devices": devices,
        "device_memory_bytes": target.memory_bytes,
        "batch_size": compiled.batch_size,
        "data_parallel": compiled.data_parallel,
        "params": compiled.params,
        "memory_bytes": terms,
        "fits": terms["peak"] <= target.memory_bytes,
        "flops_per_device": flops,
        "flops_per_example": flops * devices / compiled.batch_size if flops else None,
        "flops_source": flops_source,
        "collectives": hlo.collectives(text),
        "attention": compiled.attention,
        "fused_attention_calls": hlo.fused_attention(text),
        "rematerialisations": hlo.rematerialisations(text),
        "compile_s": round(compiled.compile_s, 1),
    }
    result["estimated_largest_batch"] = estimated_largest_batch(
        terms, compiled.batch_size, compiled.unit, target.memory_bytes
    )
    if not result["fits"]:
        dominant = max(("arguments", "outputs", "temporaries"), key=terms.get)
        result["dominant"] = dominant
        result["remedy"] = REMEDIES[dominant]
    return result


def estimated_largest_batch(terms: dict, batch: int, unit: int, limit: int) -> int:
    """The largest multiple of `unit` whose peak stays within `limit`, the peak taken as linear
    in the batch from the arguments' bytes at batch 0 (the state) through one compile's
    `terms` at `batch`: an estimate from that one compile, and `largest_batch`'s first guess."""
    return max(0, _crossing(0, terms["arguments"], batch, terms["peak"], limit, unit))


def _crossing(b1: int, p1: float, b2: int, p2: float, limit: int, unit: int) -> int:
    """Where the line through (b1, p1) and (b2, p2) reaches `limit`, rounded down to `unit`."""
    return int(b1 + (limit - p1) * (b2 - b1) / (p2 - p1)) // unit * unit


def largest_batch(
    config, target: Target, max_batch: int, max_compiles: int, known=None, progress=None
):
    """The largest global batch (a multiple of the data-parallel size times accum_steps, at
    most `max_batch`) whose step fits `target`, found by shrinking a bracket over those
    multiples: each next batch is where the peak memory, interpolated between compiles,
    reaches the chip's (`_next_batch`); at most `max_compiles` compiles. `known` maps batches
    already compiled to their `memory` terms; `progress(line)`, if given, hears of each
    compile. Returns (largest fitting batch or 0, smallest failing batch or None, compiles
    spent): the answer lies in [first, second) when the compiles ran out."""
    known = dict(known or {})
    mesh = sharding.make_mesh(config.mesh, list(target.devices))
    unit = sharding.data_parallel_size(mesh) * config.accum_steps
    top = max(unit, max_batch // unit * unit)
    spent, sides = 0, []
    batch = min(max(unit, config.batch_size // unit * unit), top)
    while True:
        if batch not in known:
            spent += 1
            if progress:
                progress(f"batch search: compiling for {target.name} at batch {batch:,}")
            known[batch] = memory(compile_step(with_batch(config, batch), target))
        sides.append(known[batch]["peak"] <= target.memory_bytes)
        hi = min((b for b in known if known[b]["peak"] > target.memory_bytes), default=None)
        lo = max((b for b in known if b <= top and (hi is None or b < hi)), default=0)
        if (top + unit if hi is None else hi) - lo <= unit or spent >= max_compiles:
            return lo, hi, spent
        batch = _next_batch(known, lo, hi, unit, top, target.memory_bytes, sides)


def _next_batch(known, lo, hi, unit, top, limit, sides) -> int:
    """Where the line through the peak memory of two compiles reaches `limit`, rounded down to
    the unit and kept strictly inside the bracket (lo fits, or is 0 when nothing fitted; hi
    does not fit, or is None when everything up to `top` did). The two are the bracket's ends;
    with one end only, that end and the nearest compile beyond it, or else batch 0 at the
    arguments' bytes (the state, which a step holds at any batch). When the last compiles
    (`sides`: fits or not, in order) all moved the same end, the other end's distance from
    the limit is halved for each repeat (the Illinois rule), so that a curved peak cannot
    hold the search on one side. Doubles or halves where the line does not rise."""
    ends = [b for b in (lo, hi) if b]
    if len(ends) == 1:
        beyond = [b for b in known if (b < ends[0] if hi is None else b > ends[0])]
        ends.append(min(beyond, key=lambda b: abs(b - ends[0])) if beyond else 0)
    b1, b2 = sorted(ends)
    p1 = known[b1]["peak"] if b1 else known[b2]["arguments"]
    p2 = known[b2]["peak"]
    repeats = next((i for i, side in enumerate(reversed(sides)) if side != sides[-1]), len(sides))
    if lo and hi and repeats > 1:
        shrink = 0.5 ** (repeats - 1)
        if sides[-1]:
            p2 = limit + (p2 - limit) * shrink
        else:
            p1 = limit - (limit - p1) * shrink
    if p2 > p1:
        guess = _crossing(b1, p1, b2, p2, limit, unit)
    else:
        guess = 2 * lo if hi is None else hi // 2 // unit * unit
    return min(max(guess, lo + unit), top if hi is None else hi - unit)
