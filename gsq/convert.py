"""`gsq convert`: an official flex_gen GSQ tokenizer checkpoint as a gsq checkpoint.

flex_gen (github.com/HelmholtzAI-FZJ/flex_gen) keeps its encoder and decoder as flat block lists
(`encoder.blocks.{i}`, `decoder.blocks.{i}`) in forward order; gsq nests the same blocks in levels
but registers them in the same forward order, with the same tensors and shapes. The map is:

    flex_gen                                   gsq
    encoder.conv_in / decoder.conv_in          encoder.stem / decoder.stem
    *.blocks.{i} in order                      encoder.levels[l].blocks[j], .downsample, encoder.mid[k]
                                               decoder.mid[k], .mid_norm, decoder.levels[l].blocks[j],
                                               .upsample, .norm
      ResNetBlock net.0 / net.2 / net.3 / net.6 / skip    norm1 / conv1 / norm2 / conv2 / skip
      AttentionBlock norm / qkv_conv / proj_conv         norm / qkv / proj
      Downsample conv, DepthToSpace2DWithConv conv,      conv
      Upsample conv (nearest 2x + conv)
      AdaptiveGroupNorm2D gamma / beta                   scale / shift
    encoder.fianl_layers.0 / .2 (sic)          encoder.head.norm / encoder.head.conv
    decoder.final_layers.0 / .2                decoder.head.norm / decoder.head.conv
    quantizers.codebook.weight (nn.Embedding)  quantizer.codebook

The architecture (width, multipliers, ResBlocks per level, D, G, V, attention, adaptive norm,
up-sampling) is read from the tensor shapes. The lookup's l2 switch, beta and tie breaking cannot
be: they come from the constructor arguments that FlexTokenizer.save pickles next to the weights
(OmegaConf containers when the official training script built the model). Those are read as plain
data by a restricted unpickler that imports nothing and calls nothing but a few container
constructors, with bounded work. A readable config without `use_l2_norm` means the official
quantizer's default (False); no config at all (trainer checkpoints, bare state dicts, safetensors)
means the paper's l2 lookup, said loudly, overridable with model.l2_normalize=...
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import re
import warnings
import zipfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from .config import ModelConfig, apply_overrides, preset
from .models import GSQTokenizer
from .models.layers import (
    AdaptiveGroupNorm,
    AttentionBlock,
    DepthToSpaceUpsample,
    Downsample,
    NearestUpsample,
    ResBlock,
)

BLOCK_TENSORS = {
    ResBlock: {"net.0": "norm1", "net.2": "conv1", "net.3": "norm2", "net.6": "conv2", "skip": "skip"},
    AttentionBlock: {"norm": "norm", "qkv_conv": "qkv", "proj_conv": "proj"},
    Downsample: {"conv": "conv"},
    DepthToSpaceUpsample: {"conv": "conv"},
    NearestUpsample: {"conv": "conv"},
    AdaptiveGroupNorm: {"gamma": "scale", "beta": "shift"},
}

# Bounds on reading the pickled constructor arguments. A FlexTokenizer config pickles to a few KB,
# tens of KB with the whole training config that OmegaConf pickles along (a container's parent).
CONFIG_MAX_BYTES = 16 << 20
CONFIG_MAX_NODES = 200_000  # distinct containers and OmegaConf nodes turned into plain data
CONFIG_MAX_DEPTH = 100  # nesting of the plain data
# torch.save stores its records uncompressed, so what torch.load inflates is about the file's size.
# A compressed archive may declare far more (a 3 MB zip of a 3 GB record); allow some slack only.
ARCHIVE_MAX_INFLATION = 2
ARCHIVE_SLACK_BYTES = 64 << 20

OFFICIAL_L2_DEFAULT = False  # flex_gen's GroupSphereQuantizer(use_l2_norm=False)
ASSUMED_L2 = True  # the paper's GSQ, when a checkpoint carries no config at all


class ConversionError(ValueError):
    """The checkpoint is not a flex_gen GSQ tokenizer this converter can map."""


# ------------------------------------------------------------------------------------------------
# Reading the pickled constructor arguments as plain data


class _Foreign:
    """Stands in for any class or function a pickle names, except a few container constructors:
    records its arguments and state, runs no code. `module` and `name` say what it replaced."""

    module = name = ""

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.kwargs, self.state = args, kwargs, None
        return self

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        self.state = state


_SCALARS = (str, int, float, bool, bytes, type(None))


def _hashable(item):
    """Only scalars may be dict keys or set members: hashing a tuple that the memo opcodes nest into
    a DAG (t = (t1,) * 40, ...) takes time exponential in its depth."""
    if type(item) not in _SCALARS:
        raise pickle.UnpicklingError(f"a {type(item).__name__} as a dict key or set member")
    return item


def _plain_dict(items=(), **kwargs) -> dict:
    pairs = list(items.items()) if isinstance(items, dict) else items
    if not isinstance(pairs, (list, tuple)) or kwargs:
        raise pickle.UnpicklingError("dict() of something other than pairs")
    return {_hashable(key): value for key, value in pairs}


def _plain_set(items=()) -> set:
    if not isinstance(items, (list, tuple)):
        raise pickle.UnpicklingError("set() of something other than a list")
    return {_hashable(item) for item in items}


def _plain_sequence(kind: type):
    def build(items=()):
        if not isinstance(items, (list, tuple)):
            raise pickle.UnpicklingError(f"{kind.__name__}() of something other than a list")
        return kind(items)

    return build


# The only callables a config pickle reaches. Types such as builtins.int appear in OmegaConf's
# metadata as values, never needed: they become stand-ins like everything else (no str(), whose
# repr of a nested DAG is exponential, no bytes(n), which allocates n bytes).
_CONSTRUCTORS = {
    ("builtins", "dict"): _plain_dict,
    ("collections", "OrderedDict"): _plain_dict,
    ("collections", "defaultdict"): lambda factory=None: {},  # OmegaConf's resolver cache
    ("builtins", "set"): _plain_set,
    ("builtins", "frozenset"): lambda items=(): frozenset(_plain_set(items)),
    ("builtins", "list"): _plain_sequence(list),
    ("builtins", "tuple"): _plain_sequence(tuple),
    ("builtins", "complex"): complex,
}


class _ConfigUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (its opcodes can be overridden, unlike the C one's) with every
    global replaced by a stand-in and only scalar dict keys and set members."""

    dispatch = dict(pickle._Unpickler.dispatch)
    MAX_GLOBALS = 1000  # distinct names; an OmegaConf config pickle names about ten

    def __init__(self, file) -> None:
        super().__init__(file)
        self.stand_ins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        if self.proto < 3:  # Python 2 names (__builtin__.set, ...), as the pickle module maps them
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _CONSTRUCTORS:
            return _CONSTRUCTORS[module, name]
        if (module, name) not in self.stand_ins:
            if len(self.stand_ins) >= self.MAX_GLOBALS:
                raise pickle.UnpicklingError(f"more than {self.MAX_GLOBALS} distinct globals")
            self.stand_ins[module, name] = type("Foreign", (_Foreign,), {"module": module, "name": name})
        return self.stand_ins[module, name]

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not plain data")

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self.stack[-1][_hashable(key)] = value

    def load_setitems(self):
        items = self.pop_mark()
        target = self.stack[-1]
        for i in range(0, len(items), 2):
            target[_hashable(items[i])] = items[i + 1]

    def load_dict(self):
        items = self.pop_mark()
        self.append({_hashable(items[i]): items[i + 1] for i in range(0, len(items), 2)})

    def load_additems(self):
        items = self.pop_mark()
        target = self.stack[-1]
        for item in items:
            target.add(_hashable(item))

    def load_frozenset(self):
        items = self.pop_mark()  # first: it replaces self.append
        self.append(frozenset(_hashable(item) for item in items))

    for opcode, method in (
        (pickle.SETITEM, load_setitem),
        (pickle.SETITEMS, load_setitems),
        (pickle.DICT, load_dict),
        (pickle.ADDITEMS, load_additems),
        (pickle.FROZENSET, load_frozenset),
    ):
        dispatch[opcode[0]] = method
    del opcode, method


class Unreadable:
    """A value that is not plain data (an object of another library); its repr names the class."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __repr__(self) -> str:
        return f"<{self.what}>"


class _PlainReader:
    """Turns unpickled objects into dicts, lists and scalars: each distinct object once (a visited
    map by id, so shared subtrees cost nothing more), at most CONFIG_MAX_NODES of them, no deeper
    than CONFIG_MAX_DEPTH; a container that contains itself is refused. OmegaConf containers and
    nodes become their content (their `_parent`, the rest of the training config, is never read)."""

    def __init__(self) -> None:
        self.done: dict[int, object] = {}
        self.open: set[int] = set()
        self.nodes = 0

    def read(self, obj, depth: int = 0):
        if isinstance(obj, _SCALARS + (complex,)):
            return obj
        key = id(obj)
        if key in self.done:
            return self.done[key]
        if key in self.open:
            raise ConversionError("its pickled config contains itself (a self-referencing container)")
        self.nodes += 1
        if self.nodes > CONFIG_MAX_NODES or depth > CONFIG_MAX_DEPTH:
            raise ConversionError(
                f"its pickled config is larger than {CONFIG_MAX_NODES:,} containers or nested "
                f"deeper than {CONFIG_MAX_DEPTH}: not a model config"
            )
        self.open.add(key)
        try:
            if isinstance(obj, dict):
                out = {k: self.read(v, depth + 1) for k, v in obj.items()}
            elif isinstance(obj, (list, tuple)):
                out = [self.read(v, depth + 1) for v in obj]
            elif isinstance(obj, (set, frozenset)):
                out = sorted(obj, key=repr)
            elif isinstance(obj, _Foreign) and obj.module.split(".")[0] == "omegaconf":
                out = self._omegaconf(obj, depth)
            else:
                what = f"{obj.module}.{obj.name}" if isinstance(obj, _Foreign) else type(obj).__name__
                out = Unreadable(what)
        finally:
            self.open.discard(key)
        self.done[key] = out
        return out

    def _omegaconf(self, obj: _Foreign, depth: int):
        """DictConfig / ListConfig (state `_content`: {key: node}, [node], None or an interpolation
        string), UnionNode (`_content`: a node) and value nodes (`_val`)."""
        state = obj.state
        if isinstance(state, dict) and isinstance(state.get("__dict__"), dict):  # older OmegaConf
            state = state["__dict__"]
        if isinstance(state, dict):
            for field in ("_content", "_val"):
                if field in state:
                    return self.read(state[field], depth + 1)
        return Unreadable(f"{obj.module}.{obj.name}")


def read_constructor_arguments(blob) -> dict | None:
    """flex_gen's pickled FlexTokenizer arguments (or a dict of them) as plain data; None when the
    blob is no readable dict. ConversionError when reading it would take unbounded work."""
    if isinstance(blob, dict):
        arguments = blob
    elif isinstance(blob, (bytes, bytearray)):
        if len(blob) > CONFIG_MAX_BYTES:
            raise ConversionError(f"its pickled config has {len(blob):,} bytes (at most {CONFIG_MAX_BYTES:,} are read)")
        try:
            arguments = _ConfigUnpickler(io.BytesIO(bytes(blob))).load()
        except Exception:  # no foreign code runs; any failure means "not plain data"
            return None
    else:
        return None
    plain = _PlainReader().read(arguments)
    return plain if isinstance(plain, dict) else None


def _find_key(tree, key: str, budget: int = CONFIG_MAX_NODES):
    """(found, value) of the first `key` in nested dicts and lists, breadth first: each distinct
    container visited once, at most `budget` of them."""
    queue, seen = deque([tree]), set()
    while queue and budget > 0:
        node = queue.popleft()
        if id(node) in seen:
            continue
        seen.add(id(node))
        budget -= 1
        if isinstance(node, dict):
            if key in node:
                return True, node[key]
            queue.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            queue.extend(v for v in node if isinstance(v, (dict, list)))
    return False, None


# ------------------------------------------------------------------------------------------------
# Reading the checkpoint


def _check_archive(path: Path) -> None:
    """Refuse a zip whose records would inflate far beyond the file (torch.load allocates them all
    before any check of ours could run). torch's legacy format checks each storage's declared size
    against the bytes present itself."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise ConversionError(f"{path} cannot be read as a checkpoint: {error}") from None
    size = path.stat().st_size
    if declared > ARCHIVE_MAX_INFLATION * size + ARCHIVE_SLACK_BYTES:
        raise ConversionError(
            f"{path} declares {declared / 1e6:,.0f} MB of records in a {size / 1e6:,.1f} MB file "
            "(compressed records, which torch.save never writes); refusing to inflate them"
        )


def load_flex_gen(path: str | Path, which: str = "ema") -> tuple[dict[str, Tensor], dict | None]:
    """(tokenizer state dict, constructor arguments as plain data or None when the file holds no
    readable config) of a flex_gen file: a FlexTokenizer.save file ({'model_state_dict',
    'config'}), a trainer checkpoint ({'model', 'ema_model', ...}; `which` picks), or a bare state
    dict (.pt or .safetensors)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            package = load_file(str(path))
        else:
            _check_archive(path)
            package = torch.load(str(path), map_location="cpu", weights_only=True)
    except ConversionError:
        raise
    except Exception as error:  # torch/safetensors raise many types for bad files
        raise ConversionError(f"{path} cannot be read as a checkpoint: {type(error).__name__}: {error}") from None
    if not isinstance(package, dict):
        raise ConversionError(f"{path} holds a {type(package).__name__}, not a checkpoint dictionary")
    arguments = None
    if "config" in package:
        try:
            arguments = read_constructor_arguments(package["config"])
        except ConversionError as error:
            raise ConversionError(f"{path}: {error}") from None
        if arguments is None:
            warnings.warn(
                f"{path}: its 'config' entry is not a readable FlexTokenizer config; ignoring it",
                RuntimeWarning,
                stacklevel=2,
            )
    if "model_state_dict" in package:
        state = package["model_state_dict"]
    elif "ema_model" in package or "model" in package:
        key = "ema_model" if which == "ema" and "ema_model" in package else "model"
        if which == "ema" and key != "ema_model":
            warnings.warn(f"{path} has no EMA weights; converting 'model'", RuntimeWarning, stacklevel=2)
        state = package[key]
    else:
        state = package
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConversionError(f"{path} holds no tokenizer state dict")
    # DDP / torch.compile wrappers prefix the names.
    state = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}
    return state, arguments


# ------------------------------------------------------------------------------------------------
# Reading the architecture off the shapes


def _blocks(state: dict, prefix: str) -> list[tuple[str, str, dict]]:
    """[(kind, flex_gen prefix, {tensor suffix: shape})] of `prefix`.blocks in index order."""
    indices = sorted({int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.blocks\.(\d+)\.", k))})
    if indices != list(range(len(indices))):
        raise ConversionError(f"{prefix}.blocks has gaps: {indices}")
    blocks = []
    for i in indices:
        head = f"{prefix}.blocks.{i}."
        shapes = {k[len(head) :]: tuple(v.shape) for k, v in state.items() if k.startswith(head)}
        if "net.2.weight" in shapes:
            kind = "res"
        elif "qkv_conv.weight" in shapes:
            kind = "attention"
        elif "gamma.weight" in shapes:
            kind = "adaptive_norm"
        elif set(shapes) == {"conv.weight", "conv.bias"}:
            # a C -> C conv: the encoder's stride-2 down-sampling, or the decoder's nearest 2x + conv
            out_channels, in_channels = shapes["conv.weight"][:2]
            kind = (
                "resample"
                if out_channels == in_channels
                else "depth_to_space"
                if out_channels == 4 * in_channels
                else "unknown"
            )
        else:
            kind = "unknown"
        if kind == "unknown":
            raise ConversionError(f"{head[:-1]} is not a block this converter knows (tensors: {sorted(shapes)})")
        blocks.append((kind, head[:-1], shapes))
    return blocks


def _split(blocks: list, separators: tuple[str, ...]) -> tuple[list[list], list[str]]:
    """The blocks between separator blocks (levels), and the separators' kinds."""
    segments, current, kinds = [], [], []
    for block in blocks:
        if block[0] in separators:
            segments.append(current)
            current = []
            kinds.append(block[0])
        else:
            current.append(block)
    return segments + [current], kinds


def _level(segment: list, width: int, where: str) -> tuple[int, list[str]]:
    """(the level's width, the kinds of its blocks after its width-changing ResBlock, if any)."""
    kinds = []
    for index, (kind, name, shapes) in enumerate(segment):
        if kind == "res":
            out_channels, in_channels = shapes["net.2.weight"][:2]
            if in_channels != width:
                raise ConversionError(f"{name} takes {in_channels} channels where {width} arrive")
            if out_channels != in_channels:
                if index:
                    raise ConversionError(f"{name} changes the width but is not the first block of {where}")
                width = out_channels
                continue
        elif kind != "attention":
            raise ConversionError(f"{name}: unexpected {kind} block in {where}")
        kinds.append(kind)
    return width, kinds


def _marked_mid(kinds: list[str], at_end: bool, where: str) -> int | None:
    """Mid ResBlocks marked by attention, which sits only between consecutive mid ResBlocks; None
    without attention. `kinds`: a run of ResBlocks that ends (encoder) or starts (decoder) with them."""
    attention = kinds.count("attention")
    if not attention:
        return None
    pattern = ["res"] + ["attention", "res"] * attention
    part, rest = (
        (kinds[-len(pattern) :], kinds[: -len(pattern)]) if at_end else (kinds[: len(pattern)], kinds[len(pattern) :])
    )
    if part != pattern or "attention" in rest:
        raise ConversionError(
            f"attention outside the mid blocks of the {where} (flex_gen attention_resolutions) is not supported"
        )
    return attention + 1


def _configured_mid(arguments: dict | None, key: str, counts: list[int], run: int) -> int | None:
    """The mid count of flex_gen's encoder/decoder_layer_configs (per level, then mid) when it
    describes these weights: the other levels' counts agree and last level + mid = run."""
    value = (arguments or {}).get(key)
    if not isinstance(value, list) or len(value) != len(counts) + 2:
        return None
    if not all(type(v) is int and v >= 0 for v in value) or value[:-2] != counts or value[-2] + value[-1] != run:
        return None
    return value[-1]


def _resolve_mid(run: int, marked: int | None, attention: bool, *candidates: int | None) -> int:
    """Mid ResBlocks out of the `run` ResBlocks that the last level and the mid share. No sampling
    lies between them, so every split computes the same; the best-informed candidate is taken. With
    attention on, a network without attention blocks has at most one mid ResBlock."""
    if marked is not None:
        return marked
    limit = min(run, 1) if attention else run
    for candidate in candidates:
        if candidate is not None and 0 <= candidate <= limit:
            return candidate
    return min(limit, 2)  # the paper's two mid ResBlocks


def _encoder_structure(state: dict) -> tuple[list[int], list[int], int, int | None]:
    """(level widths, ResBlocks of every level but the last, ResBlocks of the last level and the
    mid together, mid ResBlocks if attention marks them)."""
    segments, _ = _split(_blocks(state, "encoder"), ("resample",))
    widths, counts, width = [], [], state["encoder.conv_in.weight"].shape[0]
    for i, segment in enumerate(segments):
        width, kinds = _level(segment, width, f"encoder level {i}")
        widths.append(width)
        if i < len(segments) - 1:
            if "attention" in kinds:
                raise ConversionError(
                    "attention inside the encoder levels (flex_gen attention_resolutions) is not supported"
                )
            counts.append(len(kinds))
    return widths, counts, kinds.count("res"), _marked_mid(kinds, True, "encoder")


def _decoder_structure(state: dict, levels: int) -> tuple[list[int], int, int | None, bool, str]:
    """(ResBlocks of every level but the deepest, in channel_multipliers order; ResBlocks of the mid
    and the deepest level together; mid ResBlocks if marked by attention or the adaptive norm;
    adaptive norm; up-sampling)."""
    segments, samplers = _split(_blocks(state, "decoder"), ("depth_to_space", "resample"))
    if len(segments) != levels:
        raise ConversionError(
            f"the decoder up-samples {len(segments) - 1} times but the encoder down-samples {levels - 1} times"
        )
    if len(set(samplers)) > 1:
        raise ConversionError("the decoder mixes depth-to-space and nearest up-sampling")
    adaptive = any(kind == "adaptive_norm" for segment in segments for kind, _, _ in segment)
    first = [kind for kind, _, _ in segments[0]]
    mid = None
    if adaptive:  # the mid blocks end at the first adaptive norm; every later level starts with one
        if "adaptive_norm" not in first or any(not s or s[0][0] != "adaptive_norm" for s in segments[1:]):
            raise ConversionError("the decoder's adaptive norms are not where flex_gen puts them")
        split = first.index("adaptive_norm")
        mid = first[:split].count("res")
        if _marked_mid(first[:split], False, "decoder") not in (None, mid):
            raise ConversionError("attention outside the mid blocks of the decoder is not supported")
        segments = [segments[0][:split] + segments[0][split + 1 :]] + [s[1:] for s in segments[1:]]
    width = state["decoder.conv_in.weight"].shape[0]
    counts = []
    for j, segment in enumerate(segments):
        width, kinds = _level(segment, width, f"decoder level {levels - 1 - j}")
        if j == 0:
            run, mid = kinds.count("res"), mid if adaptive else _marked_mid(kinds, False, "decoder")
        elif "attention" in kinds:
            raise ConversionError(
                "attention inside the decoder levels (flex_gen attention_resolutions) is not supported"
            )
        else:
            counts.append(len(kinds))
    upsample = "nearest" if samplers and samplers[0] == "resample" else "depth_to_space"
    return counts[::-1], run, mid, adaptive, upsample


@dataclass
class LookupSettings:
    """What the checkpoint says (or what is assumed) about its quantizer's lookup."""

    l2_normalize: bool
    l2_source: str  # how l2_normalize was decided (warnings, run_info)
    assumed: bool  # no readable answer: l2_normalize is an assumption, said loudly
    beta: float = 0.25
    codebook_init: str = "spherical"
    official_ties: str = "broken at random (argmin_func='random', the official default)"


def _quantizer_value(arguments: dict, key: str):
    """(found, value) of a quantizer argument: in `quantizer_config`, else anywhere (bounded)."""
    quantizer = arguments.get("quantizer_config")
    if isinstance(quantizer, dict) and key in quantizer:
        return True, quantizer[key]
    return _find_key(arguments, key)


def lookup_settings(arguments: dict | None, code_dim: int) -> LookupSettings:
    """The lookup of the official quantizer as its constructor arguments describe it."""
    if arguments is None:
        return LookupSettings(ASSUMED_L2, "the checkpoint holds no readable config", True)

    def value(key: str):
        return _quantizer_value(arguments, key)

    found, kind = value("quantize_type")
    if found and str(kind).lower() != "gsq":
        warnings.warn(
            f"the checkpoint's quantizer is {kind!r}, not 'gsq': the lookup may differ", RuntimeWarning, stacklevel=3
        )
    if value("use_l1_norm")[1] is True:
        raise ConversionError(
            "the checkpoint's quantizer normalizes with the l1 norm (use_l1_norm=True); gsq "
            "looks up with l2 normalization or none"
        )
    found, l2 = value("use_l2_norm")
    if not found:
        settings = LookupSettings(
            OFFICIAL_L2_DEFAULT,
            "the official default use_l2_norm=False (the checkpoint's config does not set it)",
            False,
        )
    elif isinstance(l2, bool):
        settings = LookupSettings(l2, f"the checkpoint's config (use_l2_norm={l2})", False)
    else:
        settings = LookupSettings(ASSUMED_L2, f"the checkpoint's use_l2_norm is {l2!r}, not a boolean", True)
    if (
        value("force_1d_clip")[1] is True
        and value("use_uniform_init")[1] is True
        and code_dim == 1
        and not settings.l2_normalize
    ):
        raise ConversionError(
            "the checkpoint's quantizer clamps 1-d codes to [-1, 1] (force_1d_clip=True); gsq does not"
        )
    beta = value("commitment_loss_weight")[1]
    if isinstance(beta, (int, float)) and not isinstance(beta, bool):
        settings.beta = float(beta)
    settings.codebook_init = "uniform" if value("use_uniform_init")[1] is True else "spherical"
    found, argmin = value("argmin_func")
    if found and (argmin is None or str(argmin).lower() in ("default", "argmin")):
        settings.official_ties = "went to the lowest index (torch.argmin)"
    elif found and str(argmin).lower() == "softmax":
        _, tau = value("argmin_softmax_tau")
        settings.official_ties = f"did not decide: it sampled codes from softmax(-distance / {tau})"
        warnings.warn(
            "the official model sampled its codes (argmin_func='softmax'); gsq takes the nearest code",
            RuntimeWarning,
            stacklevel=3,
        )
    return settings


def infer_model_config(state: dict, arguments: dict | None = None) -> ModelConfig:
    """The gsq ModelConfig of a flex_gen tokenizer state dict (the lookup settings from
    `arguments`, the constructor arguments as plain data; None = no config)."""
    return _infer(state, arguments)[0]


def _infer(state: dict, arguments: dict | None) -> tuple[ModelConfig, LookupSettings]:
    needed = (
        "encoder.conv_in.weight",
        "encoder.fianl_layers.2.weight",
        "decoder.conv_in.weight",
        "quantizers.codebook.weight",
    )
    missing = [k for k in needed if k not in state]
    if missing:
        raise ConversionError(f"not a flex_gen FlexTokenizer state dict: missing {', '.join(missing)}")
    width = state["encoder.conv_in.weight"].shape[0]
    latent = state["encoder.fianl_layers.2.weight"].shape[0]
    codebook_size, code_dim = state["quantizers.codebook.weight"].shape
    if latent % code_dim:
        raise ConversionError(f"latent channels {latent} are not a multiple of the code width {code_dim}")
    widths, encoder_counts, encoder_run, encoder_mid = _encoder_structure(state)
    if any(w % width for w in widths):
        raise ConversionError(f"level widths {widths} are not multiples of the first width {width}")
    decoder_counts, decoder_run, decoder_mid, adaptive, upsample = _decoder_structure(state, len(widths))
    configured = (
        _configured_mid(arguments, "encoder_layer_configs", encoder_counts, encoder_run),
        _configured_mid(arguments, "decoder_layer_configs", decoder_counts, decoder_run),
    )
    attention = any(name.endswith(".qkv_conv.weight") for name in state)
    mid_e = _resolve_mid(encoder_run, encoder_mid, attention, configured[0], decoder_mid, configured[1])
    mid_d = _resolve_mid(decoder_run, decoder_mid, attention, configured[1], encoder_mid, configured[0], mid_e)
    encoder_counts.append(encoder_run - mid_e)
    decoder_counts.append(decoder_run - mid_d)
    uniform = len(set(encoder_counts + decoder_counts)) == 1 and encoder_counts[0] >= 1
    settings = lookup_settings(arguments, code_dim)
    return ModelConfig(
        width=width,
        channel_multipliers=tuple(w // width for w in widths),
        res_blocks=max(1, encoder_counts[0]),
        encoder_res_blocks=() if uniform else tuple(encoder_counts),
        decoder_res_blocks=() if uniform else tuple(decoder_counts),
        mid_blocks=mid_e,
        decoder_mid_blocks=-1 if mid_d == mid_e else mid_d,
        mid_attention=attention,
        adaptive_norm=adaptive,
        upsample=upsample,
        latent_channels=latent,
        groups=latent // code_dim,
        codebook_size=codebook_size,
        beta=settings.beta,
        l2_normalize=settings.l2_normalize,
        codebook_init=settings.codebook_init,
    ), settings


# ------------------------------------------------------------------------------------------------
# The name map


def _ordered_blocks(model: GSQTokenizer) -> dict[str, list[tuple[str, nn.Module]]]:
    """gsq's blocks in the reference's flat order, per network."""
    encoder, decoder = [], []
    for i, level in enumerate(model.encoder.levels):
        encoder += [(f"encoder.levels.{i}.blocks.{j}", b) for j, b in enumerate(level.blocks)]
        if level.downsample is not None:
            encoder.append((f"encoder.levels.{i}.downsample", level.downsample))
    encoder += [(f"encoder.mid.{k}", b) for k, b in enumerate(model.encoder.mid)]
    decoder += [(f"decoder.mid.{k}", b) for k, b in enumerate(model.decoder.mid)]
    if model.decoder.mid_norm is not None:
        decoder.append(("decoder.mid_norm", model.decoder.mid_norm))
    for i, level in enumerate(model.decoder.levels):
        decoder += [(f"decoder.levels.{i}.blocks.{j}", b) for j, b in enumerate(level.blocks)]
        for part in ("upsample", "norm"):
            if getattr(level, part) is not None:
                decoder.append((f"decoder.levels.{i}.{part}", getattr(level, part)))
    return {"encoder": encoder, "decoder": decoder}


def flex_gen_name_map(model: GSQTokenizer) -> dict[str, str]:
    """{flex_gen tensor name: gsq tensor name} for every tensor of `model`."""
    names = {
        "encoder.conv_in": "encoder.stem",
        "decoder.conv_in": "decoder.stem",
        "encoder.fianl_layers.0": "encoder.head.norm",
        "encoder.fianl_layers.2": "encoder.head.conv",
        "decoder.final_layers.0": "decoder.head.norm",
        "decoder.final_layers.2": "decoder.head.conv",
    }
    for network, blocks in _ordered_blocks(model).items():
        for i, (ours, block) in enumerate(blocks):
            for theirs_part, our_part in BLOCK_TENSORS[type(block)].items():
                names[f"{network}.blocks.{i}.{theirs_part}"] = f"{ours}.{our_part}"
    mapping = {"quantizers.codebook.weight": "quantizer.codebook"}
    ours_all = set(model.state_dict())
    for theirs_prefix, ours_prefix in names.items():
        for suffix in ("weight", "bias"):
            if f"{ours_prefix}.{suffix}" in ours_all:
                mapping[f"{theirs_prefix}.{suffix}"] = f"{ours_prefix}.{suffix}"
    return mapping


def convert_state_dict(state: dict[str, Tensor], model: GSQTokenizer) -> dict[str, Tensor]:
    """flex_gen tensors renamed to gsq's, every tensor accounted for and shape-checked."""
    mapping = flex_gen_name_map(model)
    expected = model.state_dict()
    unmapped = sorted(set(state) - set(mapping))
    absent = sorted(set(mapping) - set(state))
    if unmapped or absent:
        detail = []
        if unmapped:
            detail.append(f"{len(unmapped)} tensors of the checkpoint have no place in gsq (e.g. {unmapped[0]})")
        if absent:
            detail.append(f"{len(absent)} gsq tensors are missing from the checkpoint (e.g. {absent[0]})")
        raise ConversionError("the checkpoint does not map onto the inferred architecture: " + "; ".join(detail))
    converted = {}
    for theirs, ours in mapping.items():
        tensor = state[theirs]
        if tuple(tensor.shape) != tuple(expected[ours].shape):
            raise ConversionError(
                f"{theirs} has shape {tuple(tensor.shape)}, but {ours} needs {tuple(expected[ours].shape)}"
            )
        converted[ours] = tensor.detach().to(expected[ours].dtype).contiguous()
    return converted


# ------------------------------------------------------------------------------------------------
# Writing


def check_output(output: str | Path, overwrite: bool = False) -> Path:
    """The output folder, if convert may write it: a new folder, an empty one, or (with overwrite)
    a gsq checkpoint folder. Never a file, a symbolic link, the current folder or one holding other
    files. Checked before anything is read."""
    path = Path(output).expanduser()
    if path.name in ("", ".", ".."):
        raise ConversionError(f"output {str(output)!r} must name a new folder (e.g. converted/)")
    try:
        if path.is_symlink():
            state = "a dangling symbolic link" if not path.exists() else "a symbolic link"
            raise ConversionError(f"output {path} is {state}; name a new folder")
        if path.exists() and not path.is_dir():
            raise ConversionError(f"output {path} is an existing file; name a new folder")
        here = Path.cwd().resolve()
        if path.resolve() in (here, *here.parents):
            raise ConversionError(f"output {path} is the current folder or contains it; name a new folder")
        if path.is_dir() and any(path.iterdir()):
            if not (path / "state.json").is_file():
                raise ConversionError(f"output {path} is a folder holding other files; name a new or empty folder")
            if not overwrite:
                raise ConversionError(f"output {path} already holds a checkpoint; pass --overwrite to replace it")
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise ConversionError(f"output {path} cannot be created: {ancestor} is a file")
    except OSError as error:
        raise ConversionError(f"output {path} cannot be checked: {error.strerror or error}") from None
    return path


def run_info(source: Path, which: str, settings: LookupSettings, model_config: ModelConfig) -> dict:
    """What the official model computed and what the converted one computes, so that nobody expects
    bit-identical tokens."""
    lookup = getattr(model_config, "quantizer_lookup", "dot")
    ours = (
        "the truly nearest code (distances decided as if exact)"
        if lookup == "exact"
        else "the best float32 dot product"
    )
    return {
        "converted_from": str(source.resolve()),
        "converted_weights": which,
        "l2_normalize": {
            "value": model_config.l2_normalize,
            "decided_by": ("assumed: " if settings.assumed else "") + settings.l2_source,
        },
        "official_lookup": "the official trainer and evaluation ran under bf16 autocast, so its distances "
        "||n||^2 + ||c||^2 - 2<n, c> were computed in bfloat16; exact ties were "
        f"{settings.official_ties}",
        "gsq_lookup": f"float32 vectors (float64 for float64 inputs), never autocast; model.quantizer_lookup="
        f"{lookup!r}: {ours}; exact ties go to the lowest index",
        "expect": "identical weights and, for the same tokens, the same decoded images up to float rounding; "
        "tokens can differ from the official model's wherever codes are nearly tied (most often at "
        "small d and large V), so token-for-token equality is not expected",
    }


def _overridden(overrides, key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def convert_checkpoint(
    source: str | Path, output: str | Path, overrides: list[str] = (), which: str = "ema", overwrite: bool = False
) -> Path:
    """Write a weights-only gsq checkpoint folder (load it with gsq.checkpoint.load_checkpoint).
    An existing checkpoint at `output` is replaced only with overwrite=True."""
    output = check_output(output, overwrite)
    source = Path(source).expanduser()
    state, arguments = load_flex_gen(source, which)
    model_config, settings = _infer(state, arguments)
    if settings.assumed and not _overridden(overrides, "model.l2_normalize"):
        warnings.warn(
            f"{source}: the lookup's l2 normalization cannot be read ({settings.l2_source}); assuming "
            f"model.l2_normalize={str(ASSUMED_L2).lower()} (the paper's GSQ); pass "
            f"model.l2_normalize={str(not ASSUMED_L2).lower()} if it was trained with "
            f"use_l2_norm={not ASSUMED_L2} (the official quantizer's default)",
            RuntimeWarning,
            stacklevel=2,
        )
    base = preset("F16-D16-G8-V256k" if model_config.downsampling >= 16 else "F8-D64-G16-V8k")
    base.preset = "flex_gen"
    base.model = model_config
    config = apply_overrides(base, list(overrides))
    if _overridden(overrides, "model.l2_normalize"):
        said = "unknown: " if settings.assumed else ""
        settings.l2_source = f"the command line (from the checkpoint alone: {said}{settings.l2_source})"
        settings.assumed = False
    with torch.device("meta"):
        skeleton = GSQTokenizer(config.model)
    tensors = convert_state_dict(state, skeleton)
    model = GSQTokenizer(config.model)
    model.load_state_dict(tensors)  # proves the converted tensors load (strict)
    weights = ckpt.module_tensors(model)
    info = run_info(source, which, settings, config.model)
    try:
        return ckpt.write_checkpoint(
            output.parent,
            output.name,
            config,
            {"ema": weights, "generator": weights},
            {"step": 0, "converted_from": info["converted_from"], "converted_weights": which, "run_info": info},
            update_latest=False,
        )
    except OSError as error:
        raise ConversionError(f"cannot write {output}: {error}") from None
