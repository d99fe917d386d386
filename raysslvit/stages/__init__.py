"""One module per stage; each has `worker` (runs on a Ray Train worker or in-process) and `run`."""
from raysslvit.stages import finetune, probe, ssl

# stage name -> (config section whose fields are its CLI flags, run function)
STAGES = {
    "ssl": ("ssl", ssl.run),
    "probe": ("probe", probe.run),
    "finetune": ("finetune", finetune.run),
}
