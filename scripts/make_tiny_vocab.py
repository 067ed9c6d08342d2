"""Write evlp/assets/tiny_tokenizer: a small uncased WordPiece vocabulary for tests and the quickstart.

It holds the special tokens, single characters (word-initial and ``##`` continuation) so that any
English text tokenizes without [UNK], every word of the synthetic captions as one token, and a few
hundred frequent English words. Run from the repository root: ``python scripts/make_tiny_vocab.py``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from evlp.data.synth import SYNTH_WORDS

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
COMMON = """
the of and to in is was for on that with as by at from it be this are an or his have not had her
which but they you were their one all we can has there been if more when will would who so no she
other its may these some them than only into two time could first new most then any over such
after also many before through where about out up what like man people made must did just very
between him each few those while both same own under being same during without again around
however here another much well because until down even way day world year years work life
part place small large big little long high good great old young right left top bottom front back
side near far next last inside outside above below behind beside between along across against
red green blue yellow white black gray grey brown pink purple orange color colour colors dark light
bright sky water sea river lake beach sand grass tree trees forest flower flowers field road street
city town house building room wall door window table chair bed car bus train plane boat bike
dog dog cat horse bird birds cow sheep animal animals person woman women men child children boy
girl people group family friend player team food plate pizza cake bread fruit apple banana
photo picture image view close shot sitting standing walking running riding playing holding eating
looking wearing sits stands walks runs rides plays holds eats looks wears shirt hat ball game
snow rain sun night day morning evening summer winter open empty full round shape shapes circle
square triangle star cross diamond line lines object objects thing things one two three four five
""".split()
SUFFIXES = ["##s", "##es", "##ed", "##ing", "##er", "##ly", "##est", "##y", "##n", "##d"]


def build() -> list[str]:
    chars = list(string.ascii_lowercase) + list(string.digits) + list(string.punctuation)
    vocab = SPECIALS + chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    for word in SUFFIXES + sorted(SYNTH_WORDS) + COMMON:
        if word not in vocab:
            vocab.append(word)
    return vocab


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "evlp" / "assets" / "tiny_tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    vocab = build()
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512,
              "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
              "mask_token": "[MASK]"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    print(f"{len(vocab)} tokens -> {out}")


if __name__ == "__main__":
    main()
