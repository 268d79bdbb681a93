"""The process `math_answer_match` runs math-verify in: `python rlhf_lightning/rewards/math_worker.py`.

One JSON request per line on stdin, `{"gold": str, "pred": str, "rounding": int, "timeout": int}`, one JSON answer
per line on stdout: true / false, or null when the reference itself cannot be parsed. It prints `ready` once
math-verify is imported. Run as a file, it imports nothing of rlhf_lightning (whose __init__ would load torch and
Lightning), so it starts in about a second. The parent kills it
when an answer takes longer than its timeout (sympy can spend minutes on `9^{9^{9^{9}}}`, inside C code no
signal interrupts) and starts a new one; math-verify's own signal-based timeouts also run here, on this process's
main thread, so a worker left behind by a dead parent does not spin forever either.
"""

from __future__ import annotations

import json
import logging
import os
import sys


def compare(gold: str, pred: str, rounding: int, timeout: int) -> bool | None:
    """Whether math-verify finds `pred` equivalent to `gold` (both read as LaTeX, then as plain expressions)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_parsed = parse(f"${gold}$", extraction_config=config, parsing_timeout=timeout)
    if not gold_parsed:
        return None
    pred_parsed = parse(f"${pred}$", extraction_config=config, parsing_timeout=timeout)
    return bool(pred_parsed) and bool(verify(gold_parsed, pred_parsed, float_rounding=rounding,
                                             timeout_seconds=timeout))


def main() -> None:
    logging.disable(logging.WARNING)  # math-verify logs every timeout and parse failure
    import math_verify  # noqa: F401 - imported before `ready`, so the first request's timeout is not spent on it

    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            result = compare(request["gold"], request["pred"], request["rounding"], request["timeout"])
        except Exception:  # noqa: BLE001 - an answer math-verify chokes on is not a correct one
            result = False
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))  # run as a file: its folder must not shadow top-level modules
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    main()
