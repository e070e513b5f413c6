"""``reste-timm push``: upload a saved model folder to the Hugging Face Hub.

    reste-timm push outputs/resnet20_1w1a_reste/final someone/my-bnn
    reste-timm push outputs/x/best someone/my-bnn --revision v1 --private

The folder is checked first (config, every key and shape); only ``model.safetensors``,
``config.json`` and ``README.md`` are sent. This is also how an upload that failed at the end of
training is retried. Exit codes: 0 uploaded, 2 a bad folder, 1 the upload failed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..files import CheckpointError, first_line
from ..hub.save import push_folder

PROG = "reste-timm push"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a saved model folder (model.safetensors, config.json, README.md)")
    parser.add_argument("repo_id", help="org/name on the Hub (created if missing)")
    parser.add_argument("--revision", default=None, help="branch (created from main if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--commit-message", default="Add ReSTE model")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead")
    args = parser.parse_args(argv)
    try:
        info = push_folder(args.folder, args.repo_id, private=args.private or None, revision=args.revision,
                           commit_message=args.commit_message, create_pr=args.create_pr)
    except CheckpointError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001  (network and Hub errors have many types; all mean "not uploaded")
        print(f"{PROG}: error: upload of {args.folder} to {args.repo_id} failed: {first_line(e)}",
              file=sys.stderr)
        return 1
    print(f"uploaded {args.folder} to {getattr(info, 'commit_url', None) or args.repo_id}")
    return 0
