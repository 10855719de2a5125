"""Chat with an exported model in the terminal, its answers printed as they are generated.

    python samples/chat.py OUTDIR [--system TEXT] [--max-new-tokens N] [--temperature T]

OUTDIR is a `lmexport convert` folder with tokenizer.json and a chat template (tokenizer_config
.json or chat_template.jinja). Uses only `lmexport.runtime` (no torch). An empty line or end of
input (Ctrl-D) ends the chat.
"""

from __future__ import annotations

import argparse
import sys

from lmexport.errors import LmexportError
from lmexport.runtime import LlamaRunner, load_chat_template


def main() -> int:
    parser = argparse.ArgumentParser(description="Chat with an exported model.")
    parser.add_argument("folder")
    parser.add_argument("--system", default=None, help="A system message to start with.")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy.")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--provider", default="cpu", help="cpu, cuda or auto.")
    args = parser.parse_args()
    try:
        runner = LlamaRunner.load(args.folder, provider=args.provider)
        template = load_chat_template(args.folder)
        tokenizer = runner.tokenizer
    except LmexportError as e:
        print(f"chat.py: {e}", file=sys.stderr)
        return 2
    messages = [{"role": "system", "content": args.system}] if args.system else []
    end_ids = runner.eos_token_ids + template.end_token_ids(tokenizer)
    limit = int(runner.config["max_position_embeddings"])
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        try:
            ids = template.encode(tokenizer, messages)
            steps = runner.stream_text(
                [ids],
                min(args.max_new_tokens, limit - len(ids)),
                eos_token_id=end_ids,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
            )
            answer = ""
            for step in steps:
                answer += step.text[0]
                print(step.text[0], end="", flush=True)
        except LmexportError as e:  # the conversation outgrew the context, say
            print(f"chat.py: {e}", file=sys.stderr)
            return 2
        print()
        messages.append({"role": "assistant", "content": answer})
    return 0


if __name__ == "__main__":
    sys.exit(main())
