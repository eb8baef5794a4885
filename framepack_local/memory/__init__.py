"""Memory: probe the machine, plan where every model lives (pure), keep it there per stage, measure."""
