"""Run the tdpipe_hf Gradio demo: ``python demo/app.py [--model DIR] [--port N] ...``.

The app lives in the package (``tdpipe_hf.apps.demo``) so that ``tdpipe demo`` works from an
installed package too; this file only starts it. Needs ``pip install -e ".[demo]"``.
"""

import sys

from tdpipe_hf.apps.demo import build_app, main, serve  # noqa: F401  (build_app/serve for importers)

if __name__ == "__main__":
    sys.exit(main())
