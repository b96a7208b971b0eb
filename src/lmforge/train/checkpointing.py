"""Training checkpoints: what `Trainer` writes beside the weights, and how it reads it back safely.

RUN_DIR/checkpoint-NNNNNN/ is a Hugging Face model directory (or, for LoRA, a PEFT adapter directory)
with the training state beside the weights, never inside them:

    trainer_state.json                   step, tokens seen, world size, the fp16 grad scaler's state, and
                                         the size of every other file (a truncated file is noticed)
    training_state.{safetensors,json}    trainable weights + buffers (fp32 masters), optimizer  (1 process, DDP)
    training_state_rank{r}.{...}         rank r's shards of the same                            (FSDP)
    rank{r}.{safetensors,json}           rank r's RNG states (python, numpy, torch, CUDA) and data position

No file here is a pickle. A checkpoint is something people share and download, and unpickling runs
whatever code the file names, so a state is stored as tensors (safetensors) plus JSON (`save_state`):
loading one can only ever produce tensors, numbers, strings, lists and dicts.

Each checkpoint is written into a hidden temporary directory that is renamed into place as the last
act, so a process killed at any moment leaves only complete checkpoints; `resume: auto` takes the
newest one that verifies, and falls back to an older one, with a warning, when the newest is damaged.

With `train.keep_best`, RUN_DIR/best-NNNNNN/ is the model alone (no training state) of the step with the
lowest validation loss so far, written the same way, and RUN_DIR/best links to it. A checkpoint's
trainer_state.json names the best step at its time, so the best directories that a checkpoint still
names are kept (resuming from it needs its best), and the others deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.checkpoint import CheckpointError
from lmforge.files import read_json, remove_directory, replace_directory, temporary_beside
from lmforge.train.environment import Env

CHECKPOINT_PREFIX = "checkpoint-"
BEST_PREFIX = "best-"
TRAINER_STATE = "trainer_state.json"
# Bumped when the layout above changes; 1 was the pickled `training_state.pt` of early versions.
FORMAT_VERSION = 2
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"  # markers in a state's JSON


# -- a state as safetensors + JSON ----------------------------------------------------------------------

def save_state(state: Any, directory: Path, name: str) -> None:
    """Write `state` (nested dicts, lists and tuples of tensors, numbers, strings, bools and None) as
    directory/name.safetensors (every tensor) + directory/name.json (the rest, tensors by reference).
    A sharded tensor (FSDP's DTensor) is saved as this process's shard."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value, where: str):
        if isinstance(value, torch.Tensor):
            local = value.to_local() if hasattr(value, "to_local") else value
            key = str(len(tensors))
            tensors[key] = local.detach().cpu().contiguous().clone()  # clone: no storage shared between keys
            return {_TENSOR: key}
        if isinstance(value, tuple):
            return {_TUPLE: [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: encode(v, f"{where}.{k}") for k, v in value.items()}
            return {_ITEMS: [[encode(k, where), encode(v, f"{where}.{k}")] for k, v in value.items()]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"{name}{where}: a {type(value).__name__} cannot be saved in a training state "
                        "(only tensors, numbers, strings, bools, None, lists, tuples and dicts)")

    skeleton = encode(state, "")
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(directory: Path, name: str, device: torch.device | str = "cpu") -> Any:
    """Read what `save_state` wrote. Raises CheckpointError naming the file for anything malformed."""
    tensor_file, json_file = directory / f"{name}.safetensors", directory / f"{name}.json"
    try:
        tensors = load_file(str(tensor_file), device=str(device))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{tensor_file}: cannot be read as safetensors ({e})") from None
    skeleton = read_json(json_file, CheckpointError, kind=None)
    used: set[str] = set()

    def decode(value):
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1 and _TENSOR in value:
            key = value[_TENSOR]
            if key not in tensors:
                raise CheckpointError(f"{json_file}: refers to tensor '{key}', which {tensor_file.name} lacks")
            used.add(key)
            return tensors[key]
        if len(value) == 1 and _TUPLE in value:
            return tuple(decode(v) for v in value[_TUPLE])
        if len(value) == 1 and _ITEMS in value:
            return {_hashable(decode(k), json_file): decode(v) for k, v in value[_ITEMS]}
        return {k: decode(v) for k, v in value.items()}

    try:
        state = decode(skeleton)
    except RecursionError:
        raise CheckpointError(f"{json_file}: nested too deeply to be read") from None
    if used != set(tensors):
        raise CheckpointError(f"{tensor_file}: holds tensors its {json_file.name} does not refer to")
    return state


def _hashable(key, file: Path):
    if isinstance(key, (list, dict)):
        raise CheckpointError(f"{file}: a dict key must be a number or a string, got {key!r:.60}")
    return key


# -- RNG states as plain data ---------------------------------------------------------------------------

def rng_state() -> dict:
    """Python's, NumPy's and torch's (CPU and CUDA) generator states, as lists, numbers and byte tensors."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), position, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to("cpu", torch.uint8) for s in state["cuda"]])


# -- finding, verifying and removing checkpoints ------------------------------------------------------------

def step_of(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Every directory named like a checkpoint (complete or not), oldest first; temporary and half-deleted
    ones are hidden dot-directories and never match."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=step_of)


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Finished checkpoints of a run (those with a trainer_state.json, written last), oldest first."""
    return [p for p in checkpoint_dirs(run_dir) if (p / TRAINER_STATE).is_file()]


def file_sizes(directory: Path) -> dict[str, int]:
    return {str(f.relative_to(directory)): f.stat().st_size for f in sorted(directory.rglob("*")) if f.is_file()}


def read_trainer_state(path: Path) -> dict:
    """trainer_state.json, checked: the format, the fields and their types, and that every file it lists
    is there with the size it had when written (a truncated or missing file is named)."""
    file = path / TRAINER_STATE
    if (path / "training_state.pt").is_file():
        raise CheckpointError(f"{path / 'training_state.pt'}: a pickled training state (lmforge before format "
                              f"{FORMAT_VERSION}); it is not loaded, because unpickling a file can run any code")
    state = read_json(file, CheckpointError)
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format {state.get('format')!r}; this lmforge reads format {FORMAT_VERSION}")
    for key, kind in (("step", int), ("tokens_seen", int), ("skipped", int), ("world_size", int), ("files", dict)):
        if not isinstance(state.get(key), kind) or isinstance(state[key], bool) or (kind is int and state[key] < 0):
            raise CheckpointError(f"{file}: field '{key}' should be a non-negative integer"
                                  if kind is int else f"{file}: field '{key}' should be an object")
    for name, size in state["files"].items():
        listed = path / name
        if not listed.is_file():
            raise CheckpointError(f"{listed}: missing (listed in {TRAINER_STATE})")
        if listed.stat().st_size != size:
            raise CheckpointError(f"{listed}: {listed.stat().st_size} bytes, but {size} were written "
                                  "(truncated or changed)")
    return state


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def resume_candidates(resume: str | None, run_dir: Path) -> list[Path]:
    """The checkpoints to try, in order: `resume: auto` gives the run's complete checkpoints newest first
    (warning about checkpoint directories without a trainer_state.json); a path gives just that one."""
    if not resume:
        return []
    if resume != "auto":
        path = Path(resume)
        if not (path / TRAINER_STATE).is_file() and not (path / "training_state.pt").is_file():
            raise CheckpointError(f"resume: {path} is not a checkpoint (no {TRAINER_STATE})")
        return [path]
    for path in checkpoint_dirs(run_dir):
        if not (path / TRAINER_STATE).is_file():
            warn(f"{path}: no {TRAINER_STATE} (an incomplete checkpoint); not resumed from")
    return complete_checkpoints(run_dir)[::-1]


def remove_stale_temporaries(run_dir: Path) -> None:
    """What a killed process left half-written or half-deleted: hidden directories named after checkpoints
    (or best models)."""
    for prefix in (CHECKPOINT_PREFIX, BEST_PREFIX):
        for path in run_dir.glob(f".*{prefix}*"):
            shutil.rmtree(path, ignore_errors=True)


def point_link_at(directory: Path, name: str = "final") -> None:
    """RUN_DIR/<name> (final, best): a symbolic link to a directory of the run, replaced in one step; `final`
    is the stable name for the next stage to read."""
    link = directory.parent / name
    tmp = directory.parent / f".{name}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(directory.name)
    os.replace(tmp, link)


def best_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"{BEST_PREFIX}{step:06d}"


def prune_best(run_dir: Path, keep: int | None) -> None:
    """Delete the best-NNNNNN directories that neither are step `keep`'s (the run's best now) nor are named
    as best by a complete checkpoint; point RUN_DIR/best at `keep`'s. A best directory written after the
    newest checkpoint by a run that was then killed is deleted when the resumed run prunes (it writes it
    again if it comes to that step: the resumed run is the same)."""
    named = {keep}
    for path in complete_checkpoints(run_dir):
        with contextlib.suppress(CheckpointError):  # a damaged checkpoint is never resumed from
            best = read_json(path / TRAINER_STATE, CheckpointError).get("best")
            named.add(best.get("step") if isinstance(best, dict) else None)
    for path in run_dir.glob(f"{BEST_PREFIX}*"):
        number = path.name[len(BEST_PREFIX):]
        if path.is_dir() and number.isdigit() and int(number) not in named:
            remove_directory(path)
    if keep is not None and best_dir(run_dir, keep).is_dir():
        point_link_at(best_dir(run_dir, keep), "best")


def loading(path: Path, what: Callable[[], Any]) -> Any:
    """Run `what()` (a step of restoring a training state from the file at `path`), turning the errors a
    malformed file causes (a wrong key, type or shape) into a CheckpointError naming it."""
    try:
        return what()
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        problem = f"missing {e}" if isinstance(e, KeyError) else str(e).splitlines()[0] if str(e) else repr(e)
        raise CheckpointError(f"{path}: {problem}") from None


# -- what a checkpoint holds: stateful objects ---------------------------------------------------------------

class Stateful(Protocol):
    """What a checkpoint saves and restores: an object whose state is plain data (numbers, strings, lists,
    tuples, dicts, tensors; see save_state)."""

    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...


class RNGState:
    """This process's random generators (python, numpy, torch, CUDA) as a Stateful."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: its shard of an FSDP DTensor, else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class TrainedWeights:
    """The weights training changes, as a Stateful: trainable parameters (their fp32 master copies where the
    model computes in bf16: `masters` pairs each such parameter with its master) and persistent buffers. The
    frozen weights are the model directory's; under FSDP each process holds (and saves) its shards."""

    def __init__(self, module: nn.Module, masters: list[tuple[nn.Parameter, nn.Parameter]]):
        self.module, self.masters = module, masters

    def state_dict(self) -> dict[str, torch.Tensor]:
        masters = {id(p): m for p, m in self.masters}
        params = dict(self.module.named_parameters())
        state = {}
        for name, tensor in self.module.state_dict().items():
            if name in params and not params[name].requires_grad:
                continue
            state[name] = masters.get(id(params[name]), tensor) if name in params else tensor
        return state

    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors into the model and its masters, checking that every trained tensor is there with
        this model's shape (copy_ would broadcast a smaller one)."""
        masters = {id(p): m for p, m in self.masters}
        params = dict(self.module.named_parameters())
        current = self.module.state_dict()
        trainable = {n for n, p in params.items() if p.requires_grad}
        extra, missing = set(saved) - set(current), trainable - set(saved)
        if extra or missing:  # e.g. a LoRA run resumed as full fine-tuning, or other target modules
            raise ValueError("does not fit this model: "
                             + (f"it has {sorted(extra)[:3]}, which the model lacks; " if extra else "")
                             + (f"it lacks trainable {sorted(missing)[:3]}" if missing else ""))
        with torch.no_grad():
            for name, tensor in saved.items():
                targets = [current[name]] + ([masters[id(params[name])]] if id(params.get(name)) in masters else [])
                for target in map(local, targets):
                    if tuple(target.shape) != tuple(tensor.shape):
                        raise ValueError(f"does not fit this model: '{name}' has shape {tuple(tensor.shape)}, "
                                         f"the model's is {tuple(target.shape)}")
                    target.copy_(tensor)


class OptimizerState:
    """An optimizer as a Stateful whose loading checks its state against the parameters: load_state_dict
    does not compare shapes (a wrong one fails at the next step, or broadcasts), and under FSDP makes each
    saved shard a DTensor laid out like its parameter."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, saved: dict) -> None:
        groups = saved["param_groups"]
        ids = [i for group in groups for i in group["params"]]
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if len(ids) != len(params):
            raise ValueError(f"the optimizer state has {len(ids)} parameters, this run trains {len(params)}")
        by_id = dict(zip(ids, params))
        state = {}
        for index, values in saved["state"].items():
            param, shaped = by_id[index], {}
            for key, value in values.items():
                if torch.is_tensor(value) and value.ndim > 0:
                    if tuple(value.shape) != tuple(local(param).shape):
                        raise ValueError(f"optimizer state '{key}' of parameter {index} has shape "
                                         f"{tuple(value.shape)}, the parameter {tuple(local(param).shape)}")
                    if param is not local(param):  # a DTensor (FSDP): this process's shard of it
                        from torch.distributed.tensor import DTensor

                        value = DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                                                   shape=param.shape, stride=param.stride())
                shaped[key] = value
            state[index] = shaped
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- saving, loading, resuming ------------------------------------------------------------------------------

@dataclass
class Checkpointer:
    """Writes and restores RUN_DIR/checkpoint-NNNNNN directories (the layout in the module docstring).

    write_weights(dir)  called on every process; rank 0 writes the model directory into `dir` (creating it)
    shared              {name: Stateful} the processes share: saved once (rank 0), or under FSDP (`sharded`)
                        each process its shards; restored on every process
    per_rank            {name: Stateful} each process's own (RNG, data position), saved and restored per rank
    progress            the run's counters (a Stateful whose state_dict() has "step"), in trainer_state.json
    A stage with more to keep (a value head, a reference model's cached log-probs) adds an entry to `shared`
    or `per_rank`; nothing here changes."""

    run_dir: Path
    env: Env
    sharded: bool
    keep_last: int
    write_weights: Callable[[Path], Any]
    shared: dict[str, Stateful]
    per_rank: dict[str, Stateful]
    progress: Stateful

    @property
    def shared_file(self) -> str:
        return f"training_state_rank{self.env.rank}" if self.sharded else "training_state"

    def save(self) -> Path:
        env, progress = self.env, self.progress.state_dict()
        final = self.run_dir / f"{CHECKPOINT_PREFIX}{progress['step']:06d}"
        # Every rank knows this name, so under FSDP all of them can write their shards into it.
        tmp = temporary_beside(final, shared=True)
        if env.is_main and tmp.exists():
            shutil.rmtree(tmp)
        self.write_weights(tmp)
        if env.is_main and not self.sharded:
            save_state({name: s.state_dict() for name, s in self.shared.items()}, tmp, self.shared_file)
        self._barrier()
        if self.sharded:
            save_state({name: s.state_dict() for name, s in self.shared.items()}, tmp, self.shared_file)
        save_state({name: s.state_dict() for name, s in self.per_rank.items()}, tmp, f"rank{env.rank}")
        self._barrier()
        if env.is_main:  # written last, with the size of every file: a checkpoint without it is incomplete
            state = {"format": FORMAT_VERSION, **progress, "world_size": env.world_size, "files": file_sizes(tmp)}
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
            replace_directory(tmp, final)  # (final exists when a step is saved again after resuming before it)
            for old in complete_checkpoints(self.run_dir)[:-max(1, self.keep_last)]:
                remove_directory(old)
        self._barrier()
        return final

    def save_model(self, path: Path) -> Path:
        """The model directory alone at `path` (a checkpoint's weights without the training state: the run's
        best model), written as atomically as a checkpoint."""
        tmp = temporary_beside(path, shared=True)
        if self.env.is_main and tmp.exists():
            shutil.rmtree(tmp)
        self.write_weights(tmp)
        self._barrier()
        if self.env.is_main:
            replace_directory(tmp, path)
        self._barrier()
        return path

    def load(self, path: str | Path) -> None:
        """Restore everything `save` wrote. Raises CheckpointError naming the file (damaged, truncated, or
        from another run) before or while restoring."""
        path, env = Path(path), self.env
        state = read_trainer_state(path)
        if state["world_size"] != env.world_size:
            raise CheckpointError(f"resume: {path} was written by {state['world_size']} processes; this run has "
                                  f"{env.world_size} (resume with the same number)")
        _restore(self.shared, load_state(path, self.shared_file, env.device), path / f"{self.shared_file}.json")
        _restore(self.per_rank, load_state(path, f"rank{env.rank}"), path / f"rank{env.rank}.json")
        loading(path / TRAINER_STATE, lambda: self.progress.load_state_dict(state))

    def resume(self, resume: str | None) -> bool:
        """Load the checkpoint `resume` names; with `auto`, the newest of the run directory that loads,
        warning about each damaged one skipped. Every process resumes from the same one. Returns whether a
        checkpoint was loaded (`auto` in a run directory without any starts afresh)."""
        candidates = resume_candidates(resume, self.run_dir)
        for number, path in enumerate(candidates):
            error = None
            try:
                self.load(path)
            except CheckpointError as e:
                error = e
            if self.env.distributed:
                loaded = torch.tensor(float(error is None), device=self.env.device)
                dist.all_reduce(loaded, op=dist.ReduceOp.MIN)
                if error is None and not loaded.item():
                    error = CheckpointError(f"{path}: another process could not load its part")
            if error is None:
                return True
            if resume != "auto" or number == len(candidates) - 1:
                raise error
            if self.env.is_main:
                warn(f"{error}; resuming from {candidates[number + 1].name} instead")
        return False

    def _barrier(self) -> None:
        if self.env.distributed:
            dist.barrier()


def _restore(entries: dict[str, Stateful], saved: Any, file: Path) -> None:
    if not isinstance(saved, dict):
        raise CheckpointError(f"{file}: expected an object of states")
    for name, stateful in entries.items():
        if name not in saved:
            raise CheckpointError(f"{file}: holds no '{name}' state")
        loading(file, lambda s=stateful, n=name: s.load_state_dict(saved[n]))
