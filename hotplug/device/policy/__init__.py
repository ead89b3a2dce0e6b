"""The device-side policy: which USB device is exported to which target.

model.py (the policy as data, and `decide`), parse.py (one file's YAML),
merge.py (the files together: `parse_policy`), files.py (`load_policy`, the
only reader of files), watch.py (noticing that the files changed). This
package's own import holds only where the files are (below): the relay process
imports model.py alone, and the command line this, neither loading PyYAML.

Rules of this package:
- Everything but files.py is pure: text in, `Policy` out (`parse_policy`);
  `Device` in, `Decision` out (`Policy.decide`). No file, socket, clock or
  randomness; no logging.
- `load_policy` is the one function that reads files. It finds the policy
  files, reads them and hands (name, text) pairs to `parse_policy`.
- A policy is all-or-nothing: any problem raises `PolicyError` (or
  `PolicyErrors`, which holds every problem found, first one first), and the
  caller keeps the policy it had. Each error names the file, the 1-based line
  and the key path (`rules[0].match.vendor`; list indexes count from 0), and
  says what was expected and what was found.
- Unknown keys are errors, never ignored: a typo must not silently export a
  device, or silently stop exporting one.

Policy files: `/etc/usbip-hotplug/policy.yaml`, then
`/etc/usbip-hotplug/policy.d/*.yaml` in file-name order. Targets are merged by
name (a name may be defined once across all files), rules are concatenated in
file order (first match wins), `settings` may appear in one file only.
"""

from pathlib import Path

DEFAULT_CONFIG_DIR = Path("/etc/usbip-hotplug")
MAIN_FILE = "policy.yaml"
DROPIN_DIR = "policy.d"
