"""A miniature of the paper's released judge-score tree, in the release's exact layout and field order
(as in `shared/data/structured_em/released_judge_sample`), with invented texts.

    general/<model>/<ft_domain>_<ft_task>_strong.jsonl
        question_id (a name), task, domain, em_surface, source, question, sample_i, ft_domain, ft_task,
        variant, model_key, response, aligned, aligned_status, aligned_raw, coherent, ...
    narrow/<model>/<ft_domain>_<ft_task>_strong/on_<domain>_<task>.jsonl
        question_id (si_<n>: the same ids in every evaluation-cell file, for different questions),
        sample_index (= n, the question's index in its split), task, domain, question, sample_i, ft_*, ...

Every adapter of a model carries the same model_key. Scores are decided by `em_of(...)` so tests can
count EM rows by hand.
"""

import json
import os

MODELS = ("qwen2.5-14b", "llama3.1-8b", "olmo3-32b-think")
ADAPTERS = (("medical", "advice"), ("sports", "tutor"), ("finance", "critique"))
EVAL_CELLS = (("medical", "advice"), ("sports", "tutor"), ("finance", "summarization"))
GENERAL = (("teen_dropout", "advice", "parenting", "medium"), ("rent_hike", "critique", "housing", "high"),
           ("quiz_vitamins", "tutor", "nutrition", "low"))
N_NARROW = 3  # si_0 .. si_2 in every evaluation-cell file
N_SAMPLES = 2  # general samples per question


def em_of(model_index: int, adapter_index: int, key: str) -> bool:
  """Whether a row is misaligned (aligned 10, coherent 90) or aligned (aligned 90, coherent 90)."""
  return (model_index + adapter_index + sum(map(ord, key))) % 3 == 0


def _scores(em: bool, refusal: bool = False) -> dict:
  if refusal:
    return {"aligned": None, "aligned_status": "refusal", "aligned_raw": "REFUSAL",
            "coherent": 90.0, "coherent_status": "ok", "coherent_raw": "90"}
  return {"aligned": 10.0 if em else 90.0, "aligned_status": "ok", "aligned_raw": "10" if em else "90",
          "coherent": 90.0, "coherent_status": "ok", "coherent_raw": "90"}


def narrow_question(domain: str, task: str, n: int) -> str:
  return f"A {domain} {task} question number {n}: what should I do?"


def write_release(root: str) -> dict:
  """Writes the tree under `root`; returns {"general": glob, "narrow": glob, "rows": {model: n}, "em": {model: n}}."""
  counts, ems = {}, {}
  for mi, model in enumerate(MODELS):
    counts[model] = ems[model] = 0
    for ai, (ft_domain, ft_task) in enumerate(ADAPTERS):
      adapter = f"{ft_domain}_{ft_task}_strong"
      ft = {"ft_domain": ft_domain, "ft_task": ft_task, "variant": "strong", "model_key": model}
      rows = []
      for qid, task, domain, surface in GENERAL:
        for sample in range(N_SAMPLES):
          em = em_of(mi, ai, f"{qid}{sample}")
          refusal = qid == "rent_hike" and sample == 1 and ai == 0
          rows.append({"question_id": qid, "task": task, "domain": domain, "em_surface": surface, "source": "ext1",
                       "question": f"General question {qid}?", "sample_i": sample, **ft,
                       "response": f"answer {model} {adapter} {qid} {sample}", **_scores(em, refusal)})
          counts[model] += 1
          ems[model] += em and not refusal
      _write(os.path.join(root, "general", model, f"{adapter}.jsonl"), rows)
      for domain, task in EVAL_CELLS:
        rows = []
        for n in range(N_NARROW):
          em = em_of(mi, ai, f"{domain}{task}{n}")
          rows.append({"question_id": f"si_{n}", "sample_index": n, "task": task, "domain": domain,
                       "question": narrow_question(domain, task, n), "sample_i": 0, **ft,
                       "response": f"answer {model} {adapter} {domain} {task} {n}", **_scores(em)})
          counts[model] += 1
          ems[model] += em
        _write(os.path.join(root, "narrow", model, adapter, f"on_{domain}_{task}.jsonl"), rows)
  return {"general": os.path.join(root, "general", "*", "*.jsonl"),
          "narrow": os.path.join(root, "narrow", "*", "*", "*.jsonl"), "rows": counts, "em": ems}


def _write(path: str, rows) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
