"""Graph passes, one job each: rewrite sites into variant ops, clean up dead nodes."""
