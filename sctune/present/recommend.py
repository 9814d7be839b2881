"""The answer in one place: what to train with, how well it does, and the PyTorch lines that reproduce it.

``recommended(config)`` picks from the final fit's full flat ``TrainConfig`` (best.json keeps all of it) only
what decides the training: the one-cycle LR and momentum, the regularization, batch size, epochs and optimizer.
``torch_snippet`` writes that as ``torch.optim.<Optimizer>(...)`` + ``OneCycleLR(... three_phase=True,
anneal_strategy='linear')``, exactly what ``schedules.one_cycle`` and ``train.make_optimizer`` build (a test
runs the snippet and compares the LR at every step). ``answer_lines`` is the block the console and report.md
open with: the configuration, the expected accuracy (final fit mean +- std over seeds), the snippet, then the
bounds and the verdict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# (flat key, label): the order a person reads them in
_SHOWN = (("optimizer", "optimizer"), ("max_lr", "max_lr"), ("div_factor", "div_factor"),
          ("cycle_frac", "cycle_frac"), ("annihilation_factor", "annihilation_factor"),
          ("max_momentum", "max_momentum"), ("min_momentum", "min_momentum"), ("weight_decay", "weight_decay"),
          ("dropout", "dropout"), ("label_smoothing", "label_smoothing"), ("batch_size", "batch_size"),
          ("epochs", "epochs"))
_TORCH_OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}


def recommended(config: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a flat TrainConfig that decide a one-cycle training, plus min_lr and final_lr derived."""
    out = {k: config[k] for k, _ in _SHOWN if k in config}
    if out.get("label_smoothing") == 0:
        out.pop("label_smoothing")
    if config.get("schedule", "onecycle") != "onecycle":
        out = {k: config[k] for k in ("optimizer", "schedule", "lr", "momentum", "weight_decay", "dropout",
                                      "batch_size", "epochs") if k in config}
        return out
    if "max_lr" in out and "div_factor" in out:
        out["min_lr"] = out["max_lr"] / out["div_factor"]
        if "annihilation_factor" in out:
            out["final_lr"] = out["min_lr"] / out["annihilation_factor"]
    return out


def _g(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def torch_snippet(config: Mapping[str, Any]) -> str | None:
    """PyTorch code reproducing the optimizer and one-cycle schedule of ``config`` (a flat TrainConfig);
    it expects ``model`` and ``train_loader`` (None for schedules other than one-cycle)."""
    if config.get("schedule", "onecycle") != "onecycle":
        return None
    opt = _TORCH_OPTIMIZERS[config.get("optimizer", "sgd")]
    max_m, min_m = config["max_momentum"], config["min_momentum"]
    wd = config["weight_decay"]
    lr0 = config["max_lr"] / config["div_factor"]
    if opt == "SGD":
        extra = f"momentum={max_m!r}" + (", nesterov=True" if config.get("nesterov") and max_m > 0 else "")
    else:
        extra = f"betas=({max_m!r}, 0.999)"  # one-cycle cycles beta1 as SGD's momentum
    if config.get("wd_norm_bias"):
        params = f"params = [{{'params': list(model.parameters()), 'weight_decay': {wd!r}}}]"
    else:
        params = ("# sctune decays weights only, not biases and normalization scales (1-D tensors)\n"
                  "decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]\n"
                  "no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]\n"
                  f"params = [{{'params': decay, 'weight_decay': {wd!r}}}, {{'params': no_decay, 'weight_decay': 0.0}}]")
    dropout = f"; the model's dropout {config.get('dropout', 0.0):.3g}" if config.get("dropout") else ""
    return "\n".join([
        "import torch",
        "",
        f"# batch size {config['batch_size']}, {config['epochs']} epochs{dropout}",
        params,
        f"optimizer = torch.optim.{opt}(params, lr={lr0!r}, {extra})",
        "scheduler = torch.optim.lr_scheduler.OneCycleLR(",
        f"    optimizer, max_lr={config['max_lr']!r}, epochs={config['epochs']}, steps_per_epoch=len(train_loader),",
        f"    pct_start={config['cycle_frac'] / 2!r}, anneal_strategy='linear', three_phase=True,",
        f"    div_factor={config['div_factor']!r}, final_div_factor={config['annihilation_factor']!r},",
        f"    cycle_momentum={bool(config.get('cycle_momentum', True))}, base_momentum={min_m!r}, max_momentum={max_m!r})",
        "# in the loop: optimizer.step(); scheduler.step()  (once per batch; the last partial batch is dropped)",
    ])


def answer_lines(best: Mapping[str, Any] | None, bounds: Mapping[str, Any] | None, *,
                 markdown: bool = False) -> list[str]:
    """The recommendation, its expected accuracy, the snippet, then the bounds and the verdict."""
    lines: list[str] = []
    head = (lambda t: ["## " + t, ""]) if markdown else (lambda t: [t])
    if best and best.get("config"):
        rec = recommended(best["config"])
        lines += head("Recommended configuration")
        width = max(len(k) for k in rec)
        body = [f"  {k:<{width}}  {_g(v)}" for k, v in rec.items()]
        lines += (["```", *body, "```", ""] if markdown else body)
        f = best.get("final") or {}
        if f.get("test_acc_mean") is not None:
            if f.get("test_acc_std") is None:
                acc = f"{f['test_acc_mean']:.4f} (the best search trial tested once; no final fit)"
            elif f.get("n", 0) < 2:  # one seed has no spread to show: say so rather than print "± 0"
                where = ", trained on train + validation" if f.get("refit") else ""
                acc = (f"{f['test_acc_mean']:.4f} (test accuracy of 1 seed{where}; its seed spread is not measured: "
                       "a larger --budget or final.seeds runs more)")
            else:
                where = ", trained on train + validation" if f.get("refit") else ""
                acc = (f"{f['test_acc_mean']:.4f} ± {f['test_acc_std']:.4f} (test accuracy, mean ± std over "
                       f"{f['n']} seeds{where})")
            lines += [f"Expected accuracy: {'**' + acc + '**' if markdown else acc}", ""]
        code = torch_snippet(best["config"])
        if code:
            lines += head("In your own PyTorch training")
            lines += (["```python", code, "```", ""] if markdown else [*("  " + c for c in code.splitlines()), ""])
    c = (bounds or {}).get("chosen")
    if c:
        lines += [f"LR bounds (stage 1): min {c['min_lr_bound']:.4g}, max {c['max_lr_bound']:.4g}, weight-decay "
                  f"prior {c['wd_prior']:g}"]
    verdict = ((bounds or {}).get("verdict") or {}).get("message")
    if verdict:
        lines += [verdict if verdict.lower().startswith("super-convergence") else f"Super-convergence: {verdict}"]
    return lines
