#!/usr/bin/env python3
"""Generate the quickstart dataset: turn a title into a valid Kubernetes object name.

The rule is RFC 1123's: lowercase, every run of other characters becomes one `-`, no
leading or trailing `-`, at most 63 characters. A base instruct model answers this with
chatter; a few minutes of LoRA teach it to answer with just the name. Deterministic
(seeded); writes k8s-names/training/data.jsonl (360 rows) and validation/data.jsonl (40).
"""

import json
import random
import re
from pathlib import Path

WORDS = (
    "billing payments search checkout inventory gateway ledger audit metrics logging frontend backend "
    "worker scheduler notifier reports analytics catalog recommender fraud identity session storage cache "
    "queue mailer thumbnails uploads exports imports pricing shipping orders invoices support chat"
).split()
QUALIFIERS = "API Service Job Cron Worker Proxy Cluster DB Queue Dashboard Pipeline Model".split()
TEAMS = "Team Alpha|Data Science|ML Platform|Growth|Core Infra|Mobile|R&D|Ops".split("|")
ENVS = ["prod", "staging", "dev", "EU-West", "us_east_1", "QA", "canary"]
ASKS = [
    "Kubernetes name for: {t}",
    "Turn this into a valid Kubernetes object name: {t}",
    'What would "{t}" be as a Kubernetes resource name?',
    "k8s name please: {t}",
    "Name the Deployment for {t}",
]


def k8s_name(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:63].rstrip("-")


def title(rng: random.Random) -> str:
    words = [w.capitalize() if rng.random() < 0.6 else w for w in rng.sample(WORDS, rng.randint(1, 3))]
    parts = [" ".join(words), rng.choice(QUALIFIERS)]
    if rng.random() < 0.35:
        parts.insert(0, rng.choice(TEAMS) + ("'s" if rng.random() < 0.5 else ":"))
    if rng.random() < 0.4:
        parts.append(f"(v{rng.randint(1, 4)})" if rng.random() < 0.5 else f"[{rng.choice(ENVS)}]")
    return " ".join(parts)


def main() -> None:
    rng = random.Random(2026)
    rows = []
    for _ in range(400):
        t = title(rng)
        ask = rng.choice(ASKS).format(t=t)
        rows.append({"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": k8s_name(t)}]})
    root = Path(__file__).parent / "k8s-names"
    for split, chunk in (("training", rows[:360]), ("validation", rows[360:])):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chunk), encoding="utf-8")


if __name__ == "__main__":
    main()
