"""Merging checkpoints on disk: safetensors read tensor by tensor, the result streamed to shards.

Inputs are Hugging Face model folders (``model.safetensors``, or shards listed in
``model.safetensors.index.json``: what ``save_pretrained`` and ``transformers.Trainer``
write) or single ``.safetensors`` files, untrusted: headers are read and checked by the
safetensors library (``safe_open``), the shards an index names must lie inside the model folder,
and every error names the input and the file. Each tensor is read when the merge needs it
(``safe_open(...).get_tensor``, a copy into a fresh tensor), and each merged tensor is written
as soon as it is made: the safetensors header of every
shard is known before the merge starts (the output keys, shapes and dtypes are planned first),
so no shard is buffered in memory. Peak extra memory is the merge's own: with one 64 MiB fp32
tensor and 3 experts, 4.2x (weight average) to 6.2x (TIES) that tensor; with one 32 MiB bf16
tensor and 1 expert, 2.3x to 4.3x; measured as the peak resident set
(``python -m bench.merge_memory``, ``bench/RESULTS.md``).

The output folder gets the shards (``model.safetensors`` when one shard suffices, else
``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``, as
``save_pretrained`` names them) and copies of the base's ``config.json``, generation config and
tokenizer files. ``out`` is checked before any input is read (not a symlink, new or empty, its
parent present), the free space before any float tensor is read; the folder is written under a
temporary name and renamed into place only when everything is written (``merge_output``): a
failed merge, SIGTERM or SIGHUP leaves no output folder, and the partial folder of a killed
merge is removed by the next merge to the same ``out``.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open

from .merge_config import MergeConfig
from .merge_output import check_free_space, check_out, clear_stale_partials, partial_folder
from .merge_plan import Entry, plan_entries
from .merging import Progress, merge_spec, merge_tensors

__all__ = ["merge_checkpoints", "merge_from_config"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
                "chat_template.json")

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian data; this machine is big-endian")


def _confinement_root(folder: Path) -> Path:
    """The folder whose files a model folder may name: the folder itself, or for a snapshot of
    the Hugging Face hub cache (``models--org--name/snapshots/<revision>``, whose files are links
    into ``models--org--name/blobs``) that repository's cache folder."""
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


def _inside(folder: Path, name: str, what: str) -> Path:
    """``folder / name``, refused when ``name`` is absolute, climbs with ``..`` or resolves
    (through symlinks) outside the folder; ``what`` names the entry in the error."""
    relative = PurePosixPath(name)
    if relative.is_absolute() or Path(name).is_absolute() or ".." in relative.parts or "\\" in name:
        raise ValueError(f"{what} is {name!r}: a shard must be a plain file name inside the model folder "
                         f"{folder} (absolute paths and '..' are refused)")
    path = folder / name
    if not path.resolve().is_relative_to(_confinement_root(folder)):
        raise ValueError(f"{what} is {name!r}, a symlink that leaves the model folder {folder}; refused")
    return path


class _SafetensorsFile:
    """The header of one ``.safetensors`` file, read and checked by the safetensors library.

    The library refuses what a hostile header holds (offsets that are negative, overlap, leave
    gaps or exceed the file, a span that differs from shape x itemsize, entries without dtype
    or shape). Each ``read`` opens the file again and closes it once the tensor is copied out,
    so the pages of the file are mapped only while one tensor is read.
    """

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name
        self.tensors = {}
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.offset_keys():
                    view = f.get_slice(key)
                    dtype = view.get_dtype()
                    if dtype not in DTYPES:
                        raise ValueError(f"{name}: {path}: tensor {key!r} has dtype {dtype}, which merging "
                                         f"does not support (supported: {sorted(DTYPES)})")
                    self.tensors[key] = (tuple(view.get_shape()), DTYPES[dtype])
        except (OSError, SafetensorError) as error:
            raise ValueError(f"{name}: {path} is not a valid safetensors file ({error})") from None

    def read(self, key: str) -> torch.Tensor:
        try:
            with safe_open(self.path, framework="pt") as f:
                return f.get_tensor(key)
        except (OSError, SafetensorError) as error:
            raise ValueError(f"{self.name}: reading tensor {key!r} of {self.path} failed ({error})") from None


class SafetensorsSource:
    """A checkpoint on disk as a ``merge_plan.TensorSource``: a folder or a ``.safetensors`` file.

    Args:
        path: an HF model folder (``model.safetensors`` or ``model.safetensors.index.json`` with its
            shards) or a ``.safetensors`` file.
        name: how errors name this input (e.g. ``"experts[1]"``).
    Raises:
        FileNotFoundError / ValueError naming the input and path when it holds no safetensors
        checkpoint, a file is not valid safetensors, the index is malformed or names a shard
        outside the folder (absolute, ``..``, or a symlink leaving it), or index and shards disagree.
    """

    def __init__(self, path, name: str):
        _check_little_endian()
        self.path, self.name = Path(path), name
        self.folder = self.path if self.path.is_dir() else None
        self._where: dict[str, _SafetensorsFile] = {}
        for file in self._files():
            for key in file.tensors:
                if key in self._where:
                    raise ValueError(f"{name}: tensor {key!r} is in both {self._where[key].path} and {file.path}")
                self._where[key] = file

    def _index(self, index: Path) -> dict[str, str]:
        """The ``weight_map`` of an index file, checked: key -> shard name."""
        try:
            content = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{self.name}: {index} is not a readable JSON index ({error})") from None
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{self.name}: {index} has no weight_map (a non-empty mapping tensor name -> "
                             f"shard file name)")
        for key, shard in weight_map.items():
            if not isinstance(shard, str) or not shard:
                raise ValueError(f"{self.name}: {index}: weight_map[{key!r}] must be a shard file name, got "
                                 f"{shard!r}")
        return weight_map

    def _files(self) -> list[_SafetensorsFile]:
        path = self.path
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ValueError(f"{self.name}: {path} is not a .safetensors file")
            return [_SafetensorsFile(path, self.name)]
        if not path.is_dir():
            raise FileNotFoundError(f"{self.name}: {path} does not exist")
        index = path / INDEX_NAME
        if index.is_file():
            weight_map = self._index(index)
            shards = {}
            for key, shard in weight_map.items():
                if shard not in shards:
                    shards[shard] = _inside(path, shard, f"{self.name}: {index}: weight_map[{key!r}]")
            files = {shard: _SafetensorsFile(shard_path, self.name) for shard, shard_path in shards.items()}
            for key, shard in weight_map.items():
                if key not in files[shard].tensors:
                    raise ValueError(f"{self.name}: {index} puts {key!r} in {shard}, which does not hold it")
            return list(files.values())
        if (path / SINGLE_NAME).is_file():
            return [_SafetensorsFile(_inside(path, SINGLE_NAME, f"{self.name}: {path / SINGLE_NAME}"), self.name)]
        raise FileNotFoundError(f"{self.name}: {path} holds neither {SINGLE_NAME} nor {INDEX_NAME} "
                                f"(save the model with save_pretrained(..., safe_serialization=True))")

    def keys(self) -> list[str]:
        """Keys in file order (shard by shard, each in its data's order)."""
        return list(self._where)

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) from the header."""
        return self._where[key].tensors[key]

    def load(self, key: str) -> torch.Tensor:
        """The tensor, read from disk into a new CPU tensor."""
        return self._where[key].read(key)


def _nbytes(entry: Entry) -> int:
    return entry.numel * torch.empty((), dtype=entry.dtype).element_size()


def _shards(entries: Sequence[Entry], max_shard_size: int) -> list[list[Entry]]:
    """Consecutive entries grouped into shards of at most ``max_shard_size`` bytes of data
    (a tensor larger than that gets a shard of its own)."""
    shards, size = [[]], 0
    for entry in entries:
        nbytes = _nbytes(entry)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _header(entries: Sequence[Entry]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for entry in entries:
        nbytes = _nbytes(entry)
        header[entry.key] = {"dtype": DTYPE_NAMES[entry.dtype], "shape": list(entry.shape),
                             "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _write_shard(path: Path, entries: Sequence[Entry], tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    try:
        with open(path, "wb") as f:
            f.write(_header(entries))
            for entry in entries:
                key, tensor = next(tensors)
                assert key == entry.key and tuple(tensor.shape) == entry.shape and tensor.dtype == entry.dtype, key
                f.write(memoryview(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy()))
                del tensor  # free before the next tensor is made
    except OSError as error:  # a full disk reports no file name: name the shard
        if error.filename is not None:
            raise
        raise OSError(error.errno, f"writing {path} failed: {error.strerror or error}") from None


def write_safetensors_folder(folder: Path, entries: Sequence[Entry], tensors: Iterator[tuple[str, torch.Tensor]],
                             max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> list[str]:
    """Write ``tensors`` (yielded in ``entries``' order) as shards of an HF folder; returns the file names.

    One shard is ``model.safetensors``; several are ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json`` (``{"metadata": {"total_size"}, "weight_map"}``).
    """
    _check_little_endian()
    shards = _shards(entries, max_shard_size)
    names = [SINGLE_NAME] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        _write_shard(folder / name, shard, tensors)
    if next(tensors, None) is not None:  # also runs the producer to its end, closing its progress bars
        raise ValueError("tensors yielded more tensors than entries lists")
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(entry) for entry in entries)},
                 "weight_map": {entry.key: name for name, shard in zip(names, shards) for entry in shard}}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        names.append(INDEX_NAME)
    return names


def merge_checkpoints(method: str, base, experts: Sequence, out, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                      progress: Progress | None = None, **options) -> Path:
    """Merge checkpoints on disk into a new HF model folder ``out``.

    The same as ``merge_from_config(MergeConfig.from_options(method, base, experts, **options), out)``.

    Args:
        method: ``"weight_average"``, ``"task_arithmetic"``, ``"ties"`` or ``"dare"`` (or a
            mergekit name: ``linear``, ``dare_linear``, ``dare_ties``).
        base: path of the base checkpoint (folder or ``.safetensors`` file); for a weight
            average it may be ``None`` (config and tokenizer then come from ``experts[0]``).
        experts: K >= 1 paths of expert checkpoints.
        out: the output folder; it must not exist or be empty.
        max_shard_size: bytes of tensor data per output shard.
        progress: ``progress(items, description, total)`` around each pass over the tensors.
        **options: the merge options of ``merging.merge_spec`` (``scaling``, ``weights``,
            ``density``, ``per_tensor``, ``exact_count``, ``merge_func``, ``count_rounding``,
            ``zero_sign``, ``drop_rate``, ``seed``,
            ``rescale``, ``ties``) and the input policies ``keys``, ``non_float``,
            ``promote_dtypes`` (``merge_plan``).
    Returns:
        The output folder. The tensors equal those of the ``merging`` function on the same
        tensors, bit for bit.
    Raises:
        ValueError / TypeError / FileNotFoundError / FileExistsError naming the argument, before
        anything is written; errors during the merge remove everything written.
    """
    config = MergeConfig.from_options(method, base, experts, **options)
    return merge_from_config(config, out, max_shard_size=max_shard_size, progress=progress)


def merge_from_config(config: MergeConfig, out, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                      progress: Progress | None = None) -> Path:
    """Run the merge ``config`` describes (``merge_config.MergeConfig``) into a new HF model folder ``out``.

    Every input is opened and checked (headers, keys, shapes, dtypes, options) before the
    output is created. See ``merge_checkpoints`` for ``out``, ``max_shard_size``, ``progress``,
    the result and the errors.
    """
    out = Path(out)
    check_out(out)
    method, base, experts, options = config.resolve()
    plan_options = dict(key_policy=options.pop("keys", "strict"), non_float=options.pop("non_float", "error"),
                        promote_dtypes=options.pop("promote_dtypes", False))
    expert_sources = [SafetensorsSource(path, f"experts[{i}]") for i, path in enumerate(experts)]
    spec = merge_spec(method, len(expert_sources), **options)
    if base is None and spec.needs_base:
        raise ValueError(f"base is required for {method}")
    base_source = SafetensorsSource(base, "base") if base is not None else None
    entries = plan_entries(base_source if spec.needs_base else None, expert_sources, **plan_options)
    if not entries:
        raise ValueError(f"the merge has no tensors to write: the inputs hold none"
                         f"{' in common (keys=intersection)' if plan_options['key_policy'] == 'intersection' else ''}")
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size < 1:
        raise ValueError(f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}")
    meta_source = base_source or expert_sources[0]
    copied = [_inside(meta_source.folder, name, f"{meta_source.name}: {meta_source.folder / name}")
              for name in COPIED_FILES if meta_source.folder is not None and (meta_source.folder / name).is_file()]
    tensors = merge_tensors(spec, base_source if spec.needs_base else None, expert_sources, entries, progress)
    clear_stale_partials(out)
    check_free_space(out, sum(_nbytes(entry) for entry in entries))
    with partial_folder(out) as partial:
        write_safetensors_folder(partial, entries, iter(tensors), max_shard_size)
        for path in copied:
            shutil.copyfile(path, partial / path.name)
    return out
