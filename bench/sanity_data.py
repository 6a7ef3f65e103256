"""Small real-text training set for the loss-sanity runs (issue 7), generated in the job.

English sentences from a fixed grammar (subject, verb, object, optional clause; number agreement),
seeded, so every framework trains on exactly the same token ids. Words map to ids base_id (1000) + their
index in the word list (the random checkpoints' tokenizer is a placeholder, so the ids are mapped
here rather than through it). Written as int32 [steps, batch, seq + 1]: frameworks that shift
labels internally (HF ``labels=input_ids``) take the whole row; ours takes ids[:, :-1] as inputs and
ids[:, 1:] as labels: the same S predictions.

    python bench/sanity_data.py --out /dev/shm/sanity.npy --steps 50 --batch 2 --seq 1024
"""

from __future__ import annotations

import argparse
import os

import numpy as np

NOUNS = ("model cat teacher river student engine city garden doctor farmer child window market "
         "painter bridge letter song forest machine kitchen").split()
VERBS = ("sees likes builds finds moves opens reads paints follows carries helps writes").split()
ADJ = "small old quiet bright heavy green careful strange warm busy".split()
CONJ = "because while although when after".split()
DET = "the a this every".split()
WORDS = sorted(set(NOUNS + [v for v in VERBS] + [v[:-1] for v in VERBS] + [n + "s" for n in NOUNS]
                   + ADJ + CONJ + DET + ["some", "they", "it", "."]))


def sentence(rng: np.random.Generator) -> list[str]:
    def noun_phrase():
        plural = rng.random() < 0.4
        det = ["some"] if plural else [str(rng.choice(DET))]
        adj = [str(rng.choice(ADJ))] if rng.random() < 0.5 else []
        n = str(rng.choice(NOUNS))
        return det + adj + [n + "s" if plural else n], plural

    subj, plural = noun_phrase()
    verb = str(rng.choice(VERBS))
    obj, _ = noun_phrase()
    out = subj + [verb[:-1] if plural else verb] + obj
    if rng.random() < 0.3:
        out += [str(rng.choice(CONJ)), "it", str(rng.choice(VERBS))] + noun_phrase()[0]
    return out + ["."]


def make_ids(steps: int, batch: int, seq: int, seed: int = 0, base_id: int = 1000) -> np.ndarray:
    ID = {w: base_id + i for i, w in enumerate(WORDS)}
    rng = np.random.default_rng(seed)
    need = steps * batch * (seq + 1)
    ids: list[int] = []
    while len(ids) < need:
        ids.extend(ID[w] for w in sentence(rng))
    return np.asarray(ids[:need], np.int32).reshape(steps, batch, seq + 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-id", type=int, default=1000, help="id of the first word")
    args = ap.parse_args(argv)
    ids = make_ids(args.steps, args.batch, args.seq, args.seed, args.base_id)
    tmp = args.out + ".tmp.npy"
    np.save(tmp, ids)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {ids.shape}, {len(WORDS)} distinct words")


if __name__ == "__main__":
    main()
