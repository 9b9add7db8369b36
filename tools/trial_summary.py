"""
Turn trial's closing line into 'N passed, N failed[, N skipped]'; exit 1 if nothing ran or anything
failed.  With --type-check-failed (tools/test.sh: mypy failed) that counts as one more failed test.
"""

import re
import sys


def summarize(text: str) -> tuple:
    match = None
    for match in re.finditer(r"^(PASSED|FAILED) \(([^)]*)\)", text, re.M):
        pass
    if match is None:
        return 0, 1, 0
    counts = dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", match.group(2)))
    passed = counts.get("successes", 0) + counts.get("expectedFailures", 0)
    failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0)
    return passed, failed, counts.get("skips", 0)


if __name__ == "__main__":
    passed, failed, skipped = summarize(open(sys.argv[1], encoding="utf-8", errors="replace").read())
    type_check_failed = "--type-check-failed" in sys.argv[2:]
    failed += int(type_check_failed)
    line = f"{passed} passed, {failed} failed"
    if skipped:
        line += f", {skipped} skipped"
    if type_check_failed:
        line += " (the type check failed: see mypy's output above)"
    print(line)
    sys.exit(0 if failed == 0 and passed > 0 else 1)
