"""The attention matcher (internal): graph helpers, layouts, masks, evaluation, matching."""
