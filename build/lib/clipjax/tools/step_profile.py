"""Where a compiled step spends its time: a `jax.profiler` trace summed over XLA's thunks.

`clipjax.bench --profile=DIR` traces a few steps into DIR (open it in TensorBoard's profile
plugin or Perfetto) and summarises it here: every thunk XLA:CPU ran (a fusion, a library
product, a copy, a collective) is named by its HLO instruction, the instruction is put in one
category from the compiled HLO text, and the thunks' wall-clock time is summed per category and per
instruction.

Categories, in the order they are tested (a fusion takes the first its computation matches):
  matmul       a dot or convolution (also YNNPACK's and oneDNN's product fusions)
  scatter      a scatter or dynamic-update-slice (e.g. the token-embedding gradient)
  reduction    a reduce (LayerNorm statistics, softmax sums, gradient norms)
  layout       only copies, transposes, bitcasts, reshapes, broadcasts, slices and
               concatenations: data moved, nothing computed
  collective   all-reduce, all-gather, collective-permute, reduce-scatter
  elementwise  everything else that XLA fused (GELU, the optimizer's update, casts)
Thunks that run at the same time share that time evenly, so the seconds are wall-clock: they
add up to the time the step was running anything.
"""

import collections
import glob
import gzip
import json
import os
import re
from collections.abc import Callable

import jax

CATEGORIES = ("matmul", "scatter", "reduction", "layout", "collective", "elementwise")
_MATMUL = {"dot", "convolution"}
_SCATTER = {"scatter", "dynamic-update-slice"}
_COLLECTIVE = {"all-reduce", "all-gather", "collective-permute", "reduce-scatter", "all-to-all"}
_LAYOUT = {
    "parameter", "constant", "copy", "transpose", "bitcast", "reshape", "broadcast", "slice",
    "dynamic-slice", "concatenate", "tuple", "get-tuple-element", "iota", "pad", "reverse",
}  # fmt: skip

# `%name = type opcode(operands), attributes` (the type may be a tuple with spaces).
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*? ([a-z][\w\-]*)\(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")


def _parse(hlo_text: str) -> dict[str, list[tuple[str, str, str | None, str]]]:
    """computation -> its instructions as (name, opcode, called computation, op_name)."""
    computations, current = collections.defaultdict(list), None
    for line in hlo_text.splitlines():
        if not line.startswith(" "):
            header = _COMPUTATION.match(line)
            current = header.group(1) if header and line.rstrip().endswith("{") else None
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            calls, op_name = _CALLS.search(line), _OP_NAME.search(line)
            computations[current].append(
                (*match.groups(), calls and calls.group(1), op_name.group(1) if op_name else "")
            )
    return computations


def _category(opcodes: set[str]) -> str:
    if opcodes & _MATMUL:
        return "matmul"
    if opcodes & _SCATTER:
        return "scatter"
    if "reduce" in opcodes or "reduce-window" in opcodes:
        return "reduction"
    if opcodes & _COLLECTIVE:
        return "collective"
    if opcodes <= _LAYOUT:
        return "layout"
    return "elementwise"


def categorize(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (category, the JAX op_name it came from), for every
    instruction of a compiled module's text (`compiled.as_text()`). A fusion is categorised by
    the opcodes of the computation it calls, nested fusions included."""
    computations = _parse(hlo_text)
    inside: dict[str, set[str]] = {}

    def opcodes(computation: str) -> set[str]:
        if computation not in inside:
            inside[computation] = set()  # a guard against cycles while it is filled
            found = set()
            for _, opcode, calls, _ in computations.get(computation, ()):
                found |= opcodes(calls) if opcode == "fusion" and calls else {opcode}
            inside[computation] = found
        return inside[computation]

    return {
        name: (_category(opcodes(calls) if opcode == "fusion" and calls else {opcode}), op_name)
        for instructions in computations.values()
        for name, opcode, calls, op_name in instructions
    }


def thunk_seconds(trace_dir: str) -> dict[str, float]:
    """HLO instruction -> wall-clock seconds of it in the newest Perfetto trace under
    `trace_dir` (`jax.profiler.trace(trace_dir, create_perfetto_trace=True)`).

    XLA:CPU runs independent thunks at once, on threads that share the cores, so a thunk's own
    duration counts time it spent waiting for them. Instead each instant of the trace is split
    evenly among the thunks running then: the seconds add up to the time anything ran.
    """
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(max(paths, key=os.path.getmtime)) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    edges = []  # (time in µs, +1 start / −1 end, op)
    for event in events:
        op = event.get("args", {}).get("hlo_op")
        if event.get("ph") == "X" and op:
            edges += [(event["ts"], 1, op), (event["ts"] + event["dur"], -1, op)]
    edges.sort(key=lambda edge: (edge[0], edge[1]))
    seconds, running, last = collections.Counter(), collections.Counter(), None
    for time, change, op in edges:
        if running and time > last:
            share = (time - last) * 1e-6 / sum(running.values())
            for name, count in running.items():
                seconds[name] += share * count
        running[op] += change
        if not running[op]:
            del running[op]
        last = time
    return dict(seconds)


def summarize(hlo_text: str, seconds: dict[str, float], steps: int, top: int = 15) -> dict:
    """Per-step seconds and shares by category, and the `top` instructions by time, from
    `thunk_seconds`; `thunk_s_per_step` is the time any thunk ran."""
    categories = categorize(hlo_text)
    by_category = collections.Counter()
    for op, s in seconds.items():
        by_category[categories.get(op, ("elementwise", ""))[0]] += s
    total = sum(by_category.values())
    ranked = sorted(seconds.items(), key=lambda item: -item[1])[:top]
    return {
        "thunk_s_per_step": total / steps,
        "by_category": {
            c: {"s_per_step": by_category[c] / steps, "share": by_category[c] / total}
            for c in CATEGORIES
        },
        "top_ops": [
            {
                "op": op,
                "category": categories.get(op, ("?", ""))[0],
                "s_per_step": s / steps,
                "share": s / total,
                "source": categories.get(op, ("", ""))[1],
            }
            for op, s in ranked
        ],
    }


def profile(run: Callable[[], object], steps: int, trace_dir: str, hlo_text: str) -> dict:
    """Trace `steps` calls of `run` (each waits for its results) into `trace_dir`, and
    `summarize` them against `hlo_text`, the compiled program `run` executes."""
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(steps):
            run()
    return summarize(hlo_text, thunk_seconds(trace_dir), steps)
