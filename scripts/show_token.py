"""Demo helper (runs inside the sandbox): summarise a served token read from stdin."""

import json
import sys
import time

token = json.load(sys.stdin)
left = int(token["expiry"] - time.time())
print(
    f"sandbox: {time.strftime('%H:%M:%S')}  access_token={token['access_token'][:18]}...  "
    f"valid for {left:2d} s  refresh_token in reply: {'refresh_token' in token}"
)
