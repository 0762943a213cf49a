"""The embedded shapes world: a captioned dataset, a tiny CLIP judge and a tiny SD pipeline, built offline."""

import lorakit  # noqa: F401  (filters two third-party import warnings before the build imports diffusers)
