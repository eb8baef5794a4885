"""FramePack Local desktop page. The Gradio UI is being built (see README); for now the command line works."""

import sys


def main() -> int:
    sys.stderr.write("The FramePack Local page is not built yet; use `./run.sh cli generate --help` for now.\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
