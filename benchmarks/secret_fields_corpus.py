"""The field names the secret rules protect on the real HAR corpus that the old list did not.

    uv run python benchmarks/secret_fields_corpus.py [--corpus tests/corpus/har/good]

For every query parameter, header, form field and JSON key in the corpus's requests and
responses, compares analyzer.secretnames (names by their words, values by shape) with
the fixed list of the previous release (SECRET_FIELDS and CREDENTIAL_HEADERS), and
prints each name only the new rules protect: where it was seen, how often, and a value
cut to 24 characters, so that a person can judge whether it is an ordinary value (an
id, a page token) wrongly hidden. Values caught by shape alone are listed apart.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from analyzer.secretnames import is_secret_name, secret_shapes
from analyzer.secrets import CREDENTIAL_HEADERS, SECRET_FIELDS, is_secret_header

ROOT = Path(__file__).resolve().parent.parent


def fields(entry: dict) -> list[tuple[str, str, str]]:
    """(where, name, value) of every named value in a HAR entry."""
    out = []
    request, response = entry.get("request") or {}, entry.get("response") or {}
    for name, value in parse_qsl(urlsplit(str(request.get("url", ""))).query, keep_blank_values=True):
        out.append(("query", name, value))
    for side, message in (("request header", request), ("response header", response)):
        for h in message.get("headers") or []:
            if isinstance(h, dict):
                out.append((side, str(h.get("name", "")), str(h.get("value", ""))))
    post = request.get("postData") or {}
    for p in post.get("params") or []:
        if isinstance(p, dict):
            out.append(("form", str(p.get("name", "")), str(p.get("value", ""))))
    text = post.get("text")
    if isinstance(text, str) and text.lstrip()[:1] == "{":
        try:
            walk(json.loads(text), out)
        except ValueError:
            pass
    return out


def walk(data: object, out: list[tuple[str, str, str]]) -> None:
    if isinstance(data, dict):
        for k, v in data.items():
            out.append(("json", str(k), v if isinstance(v, str) else json.dumps(v)[:40]))
            walk(v, out)
    elif isinstance(data, list):
        for v in data:
            walk(v, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=ROOT / "tests" / "corpus" / "har" / "good")
    args = parser.parse_args()
    old = SECRET_FIELDS | CREDENTIAL_HEADERS
    new_names: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    samples: dict[tuple[str, str], str] = {}
    shaped: Counter[tuple[str, str]] = Counter()
    total = 0
    for path in sorted(args.corpus.glob("*.har")):
        try:
            har = json.loads(path.read_text(encoding="utf-8-sig"))
        except ValueError:
            continue
        for entry in (har.get("log") or {}).get("entries") or []:
            for where, name, value in fields(entry):
                total += 1
                secret = is_secret_header(name.lower()) if "header" in where else is_secret_name(name)
                if secret and name.lower() not in old:
                    new_names[(where, name.lower())][path.stem] += 1
                    samples.setdefault((where, name.lower()), value[:24])
                elif secret_shapes(value) and name.lower() not in old:
                    shaped[(where, name.lower())] += 1
    print(f"{total:,} named values in the corpus; names only the new rules protect:\n")
    print(f"{'where':16} {'name':36} {'seen':>5}  sample value")
    for (where, name), files in sorted(new_names.items()):
        print(f"{where:16} {name[:36]:36} {sum(files.values()):>5}  {samples[(where, name)]!r}")
    print(f"\n{len(new_names)} name(s) by their words; values protected by their shape alone:")
    for (where, name), n in sorted(shaped.items()):
        print(f"{where:16} {name[:36]:36} {n:>5}")


if __name__ == "__main__":
    main()
