"""Run the Autobahn|Testsuite with kosoku against a testee; print one JSON line per case.

``python -m tests.support.autobahn_run_suite ws://127.0.0.1:9001 [--cases 1.*,2.*] [--concurrency 4]``.
In its own process: the suite's case files are Python 2-era code (they leave files open, for one)
whose warnings must not reach the test run, and its Python work must not share a GIL with it.
The last line is ``{"categories": {...}}``, the suite's category names.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import warnings


async def main(url: str, cases: list[str] | None, concurrency: int) -> None:
    import kosoku
    from kosoku._report_assets import CaseCategories

    try:
        results = await kosoku.run_fuzzingclient(url, cases, None, concurrency=concurrency)
    except kosoku.FailureError as failure:  # any case not OK, the compression ones included
        results = failure.results
    for r in results:
        print(
            json.dumps(
                {
                    "case": r.case_id,
                    "behavior": r.behavior.value,
                    "close": r.behavior_close.value,
                    "remote_close_code": r.remote_close_code,
                    "result": r.result,
                    "result_close": r.result_close,
                    "duration_ms": r.duration,
                }
            )
        )
    print(json.dumps({"categories": CaseCategories}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--cases", default=None)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    asyncio.run(main(args.url, args.cases.split(",") if args.cases else None, args.concurrency))
