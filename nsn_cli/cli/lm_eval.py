"""`nsn-lm-eval`: lm-evaluation-harness's own command line, with `--model nsn` registered.

Every flag is lm-eval's (`nsn-lm-eval --model nsn --model_args pretrained=DIR,budget=0.5
--tasks …`); the only difference from `lm_eval` is that nsn's model type is imported
first, which lm-eval 0.4.x does not do for packages outside its own.
"""

from __future__ import annotations

import sys


def main() -> None:
    from nsn_cli.stages.lm_eval_tasks import require_lm_eval

    try:
        require_lm_eval()
    except Exception as exc:  # noqa: BLE001 - NsnError: one line, like every nsn error
        print(f"nsn-lm-eval: error: {exc}", file=sys.stderr)
        sys.exit(2)
    import nsn_cli.stages.lm_eval_model  # noqa: F401 - registers the `nsn` model type
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":  # pragma: no cover
    main()
