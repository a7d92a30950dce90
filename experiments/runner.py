"""Configs -> backbone + task + reducer -> one evaluated run (Lightning), and the result row.

* `compose(overrides)`: the Hydra config tree (`experiments/conf`), every mistake a `ConfigError`;
* `load_backbone(cfg.backbone)`: the model (+ tokenizer) named by the backbone group;
* `load_task(cfg.task)`: the evaluation questions;
* `strategy_node(name)`: a strategy's config (the selected node, its YAML, or its dataclass defaults);
  budgets are mapped by the strategy itself (`framework.budget.apply_budget` -> `for_budget`);
* `EvalModule`: a LightningModule whose `test_step` runs one batch with the reducer attached and
  keeps per-sample records (answer, correctness, visual tokens per layer, accounting); works under DDP
  (each rank evaluates a disjoint shard; the records are gathered on rank 0);
* `evaluate(...)`: Trainer.test over the task + interleaved latency/memory against no reduction.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import statistics
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from framework.accounting import Accounting, prefill_flops
from framework.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent / "conf"
GROUPS = ("backbone", "task", "strategy", "run", "sweep")


# ---------------------------------------------------------------------------------------- configs
def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config"):
    """Compose `experiments/conf/config.yaml` with Hydra and OmegaConf dot-notation overrides."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    _register_strategy_defaults()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hcompose(config_name=config_name, overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_explain(err, overrides)) from None
    finally:
        GlobalHydra.instance().clear()
    if config_name == "config":
        check_overrides(cfg, overrides)
        check_strategy_fields(cfg)
        check_run(cfg.run)
    return cfg


def options(group: str) -> list[str]:
    names = {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
    if group == "strategy":
        from framework import registry

        names |= set(registry.available())
    return sorted(names)


def _explain(err: Exception, overrides) -> str:
    msg = " ".join(str(err).split()) or type(err).__name__
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key in GROUPS and value and value not in options(key):
            return f"unknown {key} option {value!r}; available: {', '.join(options(key))}"
        root = key.split(".")[0]
        if (
            "." not in key
            and key not in GROUPS
            and ("not in struct" in msg or "Could not override" in msg or "Key" in msg)
            and root in msg
        ):
            return f"unknown config key {key!r}: {msg}; groups: {', '.join(GROUPS)}"
    if "not in struct" in msg or "Could not override" in msg:
        for o in overrides:
            key = o.lstrip("+~").partition("=")[0]
            group, _, field = key.partition(".")
            if group in GROUPS and field and f"'{key}'" in msg:
                option = _chosen(group, overrides)
                allowed = ", ".join(str(k) for k in _group_keys(group, option))
                return f"unknown config key {key!r}: {group} {option!r} has {allowed}"
        return f"unknown config key: {msg}" + ("" if "+" in msg else " (add a new key with +key=value)")
    return msg


def _chosen(group: str, overrides) -> str:
    """The option of a config group the overrides select (else config.yaml's default)."""
    from omegaconf import OmegaConf

    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key == group:
            return value
    for d in OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").defaults):
        if isinstance(d, dict) and group in d:
            return str(d[group])
    return "?"


def _group_keys(group: str, option: str) -> list[str]:
    from omegaconf import OmegaConf

    if group == "strategy":
        from framework import registry
        from framework.fields import field_types

        try:
            return ["name", *field_types(registry.get(option))]
        except ConfigError:
            pass
    path = CONF_DIR / group / f"{option}.yaml"
    return [str(k) for k in OmegaConf.load(path).keys()] if path.exists() else []


def to_dict(node) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


# ---------------------------------------------------------------------------------------- backbone
@dataclasses.dataclass
class Backbone:
    model: torch.nn.Module
    tokenizer: Any
    name: str
    n_visual: int
    adapter: Any = None  # the backbone adapter, built with the config's `adapter:` options


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[str(name)]
    except KeyError:
        raise ConfigError(f"backbone dtype {name!r}; allowed: float32, float16, bfloat16") from None


def load_backbone(bcfg) -> Backbone:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a sweep shows its own two bars, not transformers' weight-loading one
    b = to_dict(bcfg)
    loader = b.get("loader")
    if loader == "toy":
        from experiments.toy.model import load_toy

        try:
            model, tok = load_toy(
                b.get("path", "toy-llava"),
                attn_implementation=b.get("attn_implementation", "sdpa"),
                dtype=_dtype(b.get("dtype", "float32")),
            )
        except FileNotFoundError as err:
            raise ConfigError(
                f"{err}; train it with `python -m experiments.toy.train` or use backbone=toy_random"
            ) from None
        name = str(b.get("path", "toy-llava"))
    elif loader == "toy_random":
        from experiments.toy.model import build_toy_model

        model, tok = build_toy_model(
            {
                **b.get("model", {}),
                "attn_implementation": b.get("attn_implementation", "sdpa"),
                "seed": b.get("seed", 0),
            }
        )
        model = model.to(_dtype(b.get("dtype", "float32"))).eval()
        name = "toy-random"
    elif loader == "random_llava":
        model = random_llava(b)
        tok, name = None, f"random-llava-{b['text']['hidden']}x{b['text']['layers']}"
    else:
        raise ConfigError(f"backbone loader {loader!r}; allowed: toy, toy_random, random_llava")
    from models import adapter_for

    adapter = adapter_for(model, **(b.get("adapter") or {}))
    return Backbone(model=model, tokenizer=tok, name=name, n_visual=int(adapter.tokens_per_image()), adapter=adapter)


def random_llava(b: dict):
    """A random-weight stock Llava of the backbone config's shapes (benchmarks; `models.random`): the last
    encoder layer's features, CLS dropped (grid x grid tokens per image)."""
    from models.random import random_backbone

    return random_backbone(
        "llava",
        {"text": b["text"], "vision": b["vision"], "feature_layer": -1},
        attn=b.get("attn_implementation", "sdpa"),
        dtype=_dtype(b.get("dtype", "float32")),
        seed=int(b.get("seed", 0)),
    )


# ---------------------------------------------------------------------------------------- task
def load_task(tcfg) -> list:
    t = to_dict(tcfg)
    if t.get("name") != "toy_vqa":
        raise ConfigError(f"task {t.get('name')!r}; available: {', '.join(options('task'))}")
    from experiments.toy import task

    for key in ("n", "seed", "batch_size"):
        if key in t and (isinstance(t[key], bool) or not isinstance(t[key], int)):
            raise ConfigError(
                f"task.{key}={t[key]!r} ({type(t[key]).__name__}); allowed: an integer"
                + (" >= 1" if key != "seed" else "")
            )
    if not isinstance(t.get("qtypes") or [], list):
        raise ConfigError(f"task.qtypes={t.get('qtypes')!r}; allowed: a list of question types {task.QTYPES}")
    n = int(t.get("n") or 0)
    qtypes = list(t.get("qtypes") or [])
    if n < 1 or not qtypes:
        raise ConfigError(
            f"task {t['name']!r} has no questions (n={n}, qtypes={qtypes}); need n >= 1 and "
            f"at least one of {task.QTYPES}"
        )
    bad = sorted(set(qtypes) - set(task.QTYPES))
    if bad:
        raise ConfigError(f"unknown question type(s) {bad}; allowed: {task.QTYPES}")
    if int(t.get("batch_size", 1)) < 1:
        raise ConfigError(f"task.batch_size must be >= 1, got {t.get('batch_size')}")
    return task.generate(int(t.get("seed", 0)), n, qtypes)


# ---------------------------------------------------------------------------------------- strategy
def strategy_node(name: str, selected=None) -> dict:
    """A strategy's config: the composed `strategy` node when it is the selected one (so `strategy.x=...`
    overrides apply), else its YAML under conf/strategy/, else its dataclass defaults."""
    from omegaconf import OmegaConf

    from framework import registry
    from framework.fields import field_defaults

    if selected is not None and selected.get("name") == name:
        return to_dict(selected)
    path = CONF_DIR / "strategy" / f"{name}.yaml"
    if path.exists():
        return to_dict(OmegaConf.load(path))
    return {"name": name, **field_defaults(registry.get(name))}


def build_reducer(fields: dict):
    from framework import registry

    return registry.build(dict(fields))


def _register_strategy_defaults() -> None:
    """Every registered strategy without a YAML becomes a `strategy` option holding its dataclass defaults,
    so `strategy=<name>` works for a strategy defined in one file (`sparsevlm run --import ...`)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from framework import registry

    for name in registry.available():
        if not (CONF_DIR / "strategy" / f"{name}.yaml").exists():
            try:
                node = OmegaConf.create(strategy_node(name))
            except Exception:  # a default OmegaConf cannot hold: the strategy needs a YAML to be selected
                continue
            ConfigStore.instance().store(group="strategy", name=name, node=node)


def check_overrides(cfg, overrides) -> None:
    """A group choice the selected sweep would ignore is an error, not a silent no-op."""
    given = {o.lstrip("+~").partition("=")[0] for o in overrides}
    sw = cfg.sweep
    if "strategy" in given and sw.get("strategies"):
        raise ConfigError(
            f"strategy={cfg.strategy.name} was given, but sweep {sw.name!r} runs its own list "
            f"{list(sw.strategies)}; run one strategy with `sweep=single strategy={cfg.strategy.name} budget=N`, "
            f"or set the list: `sweep.strategies=[none,{cfg.strategy.name}]`"
        )
    if "budget" in given and sw.get("budgets"):
        raise ConfigError(
            f"budget={cfg.budget} was given, but sweep {sw.name!r} runs its own budgets {list(sw.budgets)}; "
            f"use `sweep=single ... budget={cfg.budget}` or `sweep.budgets=[{cfg.budget}]`"
        )


def check_run(rcfg, reference=None, prefix: str = "run") -> None:
    """Each `run` setting has the type of its value in `conf/run/default.yaml` (an int stays an int, a flag a
    bool; a setting that defaults to null takes anything), before any weights load."""
    from omegaconf import OmegaConf

    ref = to_dict(reference if reference is not None else OmegaConf.load(CONF_DIR / "run" / "default.yaml"))
    for key, value in to_dict(rcfg).items():
        want = ref.get(key)
        if isinstance(want, dict) and isinstance(value, dict):
            check_run(value, want, f"{prefix}.{key}")
        elif want is not None and value is not None:
            kind = bool if isinstance(want, bool) else int if isinstance(want, int) else type(want)
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            if not ok:
                article = "an" if kind.__name__[0] in "aeiou" else "a"
                raise ConfigError(
                    f"{prefix}.{key}={value!r} ({type(value).__name__}); allowed: {article} "
                    f"{kind.__name__}, like the default {want!r}"
                )


def check_strategy_fields(cfg) -> None:
    """The selected strategy's fields against its dataclass (unknown keys, value types), before any load."""
    from framework import registry
    from framework.fields import check_fields

    cls, fields = registry.strategy_fields(cfg.strategy)
    check_fields(cls, fields, f"strategy {cls.registry_name!r}")


# ---------------------------------------------------------------------------------------- Lightning
def _quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*Consider setting `persistent_workers`.*")
    warnings.filterwarnings("ignore", ".*sync_dist.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")


class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank+world, ...: a disjoint shard per DDP rank, no padding duplicates."""

    def __init__(self, n: int):
        self.n = n

    def _rw(self):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __iter__(self):
        r, w = self._rw()
        return iter(range(r, self.n, w))

    def __len__(self):
        r, w = self._rw()
        return len(range(r, self.n, w))


class _Collate:
    def __init__(self, tokenizer, samples):
        self.tokenizer, self.samples = tokenizer, samples

    def __call__(self, idx: list[int]) -> dict:
        from experiments.toy.model import encode_batch

        batch = [self.samples[i] for i in idx]
        out = encode_batch(batch, self.tokenizer, with_labels=True)
        out["index"] = torch.tensor(idx)
        return out


def make_loader(samples, tokenizer, batch_size: int):
    ds = list(range(len(samples)))
    return torch.utils.data.DataLoader(
        ds,
        batch_sampler=torch.utils.data.BatchSampler(ShardSampler(len(ds)), batch_size, drop_last=False),
        collate_fn=_Collate(tokenizer, samples),
    )


class EvalModule(pl.LightningModule):
    """Evaluate a backbone with a reducer attached: next-token answer accuracy + per-sample records."""

    def __init__(
        self,
        model,
        tokenizer,
        reducer,
        samples_meta: list[dict],
        overlays: int = 0,
        result_path: str | None = None,
        adapter=None,
    ):
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.tokenizer = tokenizer
        self.reducer = reducer
        self.meta = samples_meta
        self.overlays = overlays
        self.result_path = result_path
        self.records: list[dict] = []
        self.result: dict | None = None
        self._engine = None

    def on_test_start(self) -> None:
        from framework import ReductionEngine

        self.records = []
        self._engine = ReductionEngine(self.model, self.reducer, adapter=self.adapter).attach()
        self._shape = self._engine.adapter.shape()

    def on_test_end(self) -> None:
        if self._engine is not None:
            self._engine.detach()
            self._engine = None

    def test_step(self, batch, batch_idx):
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"].to(self.model.dtype),
            use_cache=False,
            logits_to_keep=1,
        )
        pred = out.logits[:, -1].argmax(-1)
        correct = (pred == batch["answer_ids"]).tolist()
        shape = self._shape
        bytes_per = next(self.model.parameters()).element_size()
        words = self.tokenizer.convert_ids_to_tokens(pred.tolist())
        for b, (i, rec) in enumerate(zip(batch["index"].tolist(), self._engine.last_record)):
            acc = Accounting.from_counts(rec["visual_per_layer"], rec["tokens_per_layer"], shape, bytes_per)
            base_tokens = [rec["tokens_in"]] * len(rec["tokens_per_layer"])
            r = {
                "index": i,
                "qtype": self.meta[i]["qtype"],
                "answer": self.meta[i]["answer"],
                "pred": words[b],
                "correct": bool(correct[b]),
                "visual_per_layer": acc.visual_per_layer,
                "tokens_per_layer": acc.tokens_per_layer,
                "equivalent_tokens": acc.equivalent_tokens,
                "flops": acc.flops,
                "flops_base": prefill_flops(base_tokens, shape["hidden"], shape["ffn"]),
                "kv_bytes": acc.kv_bytes,
                "rank": self.global_rank,
            }
            if i < self.overlays:
                r["groups"] = final_groups(rec)
            self.records.append(r)

    def on_test_epoch_end(self) -> None:
        records = self.records
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        if self.global_rank == 0:
            uniq = {r["index"]: r for r in records}
            self.result = summarize([uniq[k] for k in sorted(uniq)])
            if self.result_path:
                Path(self.result_path).write_text(json.dumps(self.result))


def final_groups(rec: dict) -> list[list[int]]:
    """Surviving visual tokens at the end of the prefill, as groups of original token indices
    (a kept token is a group of one, a merged token lists its sources)."""
    if rec.get("stages"):
        return [list(g) for g in rec["stages"][-1]["groups"]]
    return [[i] for i in range(rec["n_visual_input"])]


def summarize(records: list[dict]) -> dict:
    """Accuracy (overall, per question type) and mean accounting over per-sample records."""
    n = len(records)
    if n == 0:
        raise ConfigError("the task produced no questions to evaluate")
    by_type: dict[str, list[bool]] = {}
    for r in records:
        by_type.setdefault(r["qtype"], []).append(r["correct"])
    layers = len(records[0]["visual_per_layer"])
    mean = statistics.fmean
    return {
        "n": n,
        "accuracy": mean(float(r["correct"]) for r in records),
        "acc_by_type": {k: mean(float(x) for x in v) for k, v in sorted(by_type.items())},
        "n_by_type": {k: len(v) for k, v in sorted(by_type.items())},
        "visual_per_layer": [mean(r["visual_per_layer"][i] for r in records) for i in range(layers)],
        "tokens_per_layer": [mean(r["tokens_per_layer"][i] for r in records) for i in range(layers)],
        "equivalent_tokens": mean(r["equivalent_tokens"] for r in records),
        "tflops": mean(r["flops"] for r in records) * 1e-12,
        "tflops_base": mean(r["flops_base"] for r in records) * 1e-12,
        "flops_ratio": mean(r["flops"] / r["flops_base"] for r in records),
        "kv_cache_mb": mean(r["kv_bytes"] for r in records) / 2**20,
        "overlays": [
            {"index": r["index"], "groups": r["groups"], "qtype": r["qtype"], "correct": r["correct"]}
            for r in records
            if "groups" in r
        ],
        "records": records,
    }


class RunProgress(pl.Callback):
    """One tqdm bar for the current run's batches, under the sweep's bar (Lightning's own bars stay off)."""

    def __init__(self, desc: str = "run"):
        self.desc, self.bar = desc, None

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        from tqdm.auto import tqdm

        if trainer.is_global_zero:
            total = trainer.num_test_batches[0] if trainer.num_test_batches else None
            self.bar = tqdm(total=total, desc=self.desc, unit="batch", position=1, leave=False)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer, pl_module, exception) -> None:  # Ctrl-C or an error: no stale bar
        self.on_test_epoch_end(trainer, pl_module)


def run_test(backbone: Backbone, samples: list, reducer, run_cfg, batch_size: int, desc: str = "run") -> dict:
    """Trainer.test over the samples with the reducer attached; the summary (rank 0's view). Ctrl-C inside
    (which Lightning turns into SystemExit) comes out as KeyboardInterrupt."""
    _quiet_lightning()
    r = to_dict(run_cfg)
    devices = int(r.get("devices", 1))
    progress = bool(r.get("progress", True))
    callbacks = [RunProgress(desc)] if progress else []
    meta = [{"qtype": s.qtype, "answer": s.answer} for s in samples]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        module = EvalModule(
            backbone.model, backbone.tokenizer, reducer, meta, int(r.get("overlays", 0)), path, adapter=backbone.adapter
        )
        trainer = pl.Trainer(
            accelerator=r.get("accelerator", "cpu"),
            devices=devices,
            strategy="auto" if devices == 1 else r.get("ddp", "ddp_spawn"),
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            use_distributed_sampler=False,
            callbacks=callbacks,
            inference_mode=True,
            default_root_dir=tmp,
        )
        try:
            trainer.test(module, dataloaders=make_loader(samples, backbone.tokenizer, batch_size), verbose=False)
        except SystemExit:
            if not trainer.interrupted:
                raise
            signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores SIGINT from here on
            raise KeyboardInterrupt from None
        finally:
            module.on_test_end()  # the hooks come off even when the run failed
        if module.result is not None:
            return module.result
        return json.loads(Path(path).read_text())


def latency_inputs(backbone: Backbone, samples: list, k: int) -> list[dict]:
    from experiments.toy.model import encode_batch

    dev = next(backbone.model.parameters()).device
    out = []
    for s in samples[: max(1, k)]:
        enc = encode_batch([s], backbone.tokenizer)
        enc["pixel_values"] = enc["pixel_values"].to(backbone.model.dtype)
        out.append({k2: v.to(dev) for k2, v in enc.items()})
    return out
