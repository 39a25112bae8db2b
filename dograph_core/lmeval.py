"""lm-evaluation-harness on a trained model: the zero-shot tasks others report, on our final models.

``dograph evaluate MODEL --lm-eval TASKS`` hands the model directory (a training run's ``final/``:
a Hugging Face GPT-2 with its tokenizer) to lm-evaluation-harness's ``HFLM`` and runs
``lm_eval.simple_evaluate`` on the named tasks. The standard zero-shot set at these scales is
``arc_easy,hellaswag,piqa,sciq,lambada_openai``; those tasks download their data sets from the
Hugging Face Hub, so they need a machine with hub access. A task of your own (a YAML file with
``dataset_path: json`` and local ``data_files``) runs offline: pass its directory as ``include``.

Needs the optional extra: ``pip install 'dograph[lm-eval]'``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

STANDARD_TASKS = ("arc_easy", "hellaswag", "piqa", "sciq", "lambada_openai")


class LmEvalError(ValueError):
    """lm-evaluation-harness is missing, or a task name it does not know."""


def run_lm_eval(path: str | Path, tasks: list[str], device: str = "cpu", include: Optional[str | Path] = None,
                limit: Optional[int] = None, batch_size: int = 8, num_fewshot: Optional[int] = None) -> dict[str, Any]:
    """Per task, lm-evaluation-harness's metrics (``{"results": {task: {metric: value}}, ...}``)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LmEvalError("lm-evaluation-harness is not installed: pip install 'dograph[lm-eval]'") from None
    from dograph_core.evaluate import find_model_dir

    d = find_model_dir(path)
    if not tasks:
        raise LmEvalError(f"--lm-eval: no task given; for example {','.join(STANDARD_TASKS)}")
    manager = TaskManager(include_path=str(include) if include else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or under --lm-eval-include {include}" if include else " (a task of your own: --lm-eval-include DIR)"
        raise LmEvalError(f"--lm-eval: unknown task(s) {unknown}: not in lm-evaluation-harness{where}")
    lm = HFLM(pretrained=str(d), tokenizer=str(d), device=device, batch_size=batch_size, backend="causal")
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0)
    return {
        "model": str(d),
        "results": {t: {k: v for k, v in m.items() if k != "alias"} for t, m in out["results"].items()},
        "n_samples": out.get("n-samples", {}),
        "versions": {t: str(v) for t, v in out.get("versions", {}).items()},
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "limit": limit,
    }
