"""What a compiled program holds, read from its optimised HLO text: the collectives (count and
bytes), cuDNN's fused attention calls per tower, and the rematerialisations XLA added to fit
memory.

Counts are of instructions in the program: one inside a loop (a scanned layer stack, the ring
of a contrastive loss) counts once, however many times it runs.
"""

import collections
import re

import numpy as np

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
# `%name = SHAPE op(...)`: the asynchronous form is a -start/-done pair, whose start's shape
# is a tuple (operand, result, ...) for all-gather and collective-permute.
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = (?P<shape>.*?) "
    r"(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\("
)
_TUPLE_STARTS = ("all-gather", "collective-permute")
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_CUDNN = re.compile(r'custom_call_target="__cudnn\$fmha(?P<kind>\w*)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_REMAT = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\.remat\d* = ", re.MULTILINE)


def _itemsize(dtype: str) -> int:
    """Bytes per element of an HLO element type: pred, s8 ... f64, bf16, f8e4m3fn, ..."""
    if dtype == "pred" or dtype.startswith("f8"):
        return 1
    return max(int(re.search(r"\d+", dtype).group()) // 8, 1)


def array_bytes(text: str) -> int:
    """Bytes of every array shape written in `text` (`f32[8,512]{1,0}`, `bf16[64]`, ...)."""
    return sum(
        int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) * _itemsize(dtype)
        for dtype, dims in _ARRAY.findall(text)
    )


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{op: {"count": n, "bytes": b}} over the collectives of the program, `bytes` being the
    size of their results on one device (for an all-gather, the gathered array)."""
    found = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        op = match.group("op")
        arrays = [array.group() for array in _ARRAY.finditer(match.group("shape"))]
        if match.group("start") and op in _TUPLE_STARTS:
            arrays = arrays[1:2]
        entry = found[op]
        entry["count"] += 1
        entry["bytes"] += array_bytes(" ".join(arrays))
    return {op: found[op] for op in COLLECTIVES if op in found}


def fused_attention(hlo_text: str, towers=("image_tower", "text_tower")) -> dict[str, dict]:
    """cuDNN's fused attention calls per tower: {tower: {"forward": n, "backward": m}}, a
    tower named by the module path in each call's op_name (calls of no tower go to "other")."""
    counts = {tower: {"forward": 0, "backward": 0} for tower in (*towers, "other")}
    for line in hlo_text.splitlines():
        call = _CUDNN.search(line)
        if not call:
            continue
        op_name = _OP_NAME.search(line)
        path = op_name.group(1) if op_name else ""
        tower = next((t for t in towers if t in path), "other")
        direction = "backward" if "Backward" in call.group("kind") else "forward"
        counts[tower][direction] += 1
    if not any(counts["other"].values()):
        del counts["other"]
    return counts


def rematerialisations(hlo_text: str) -> int:
    """Instructions XLA's rematerialisation pass cloned to fit the memory limit (`*.remat`)."""
    return len(_REMAT.findall(hlo_text))
