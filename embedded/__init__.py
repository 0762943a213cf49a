"""The embedded shapes world: a captioned dataset, a tiny CLIP judge and a tiny SD pipeline, built offline."""
