"""An --on-alert command for the tests: stores the JSON it gets on stdin as DIR/KIND.PID.json."""

import json
import os
import sys

alert = json.load(sys.stdin)
with open(os.path.join(sys.argv[1], f"{alert['kind']}.{os.getpid()}.json"), "w") as fh:
    json.dump(alert, fh)
