#!/bin/sh
# Install Debian's chromium for the labeling page's browser test (`make test`), if it is missing.
# Playwright's own browser download needs network access these machines don't have, so the test
# drives /usr/bin/chromium. A failure here is a warning: the browser test then skips itself.
set -u
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "warning: /usr/bin/chromium is missing and neither root nor sudo is available;" \
         "the browser test will be skipped (install the 'chromium' package)" >&2
    exit 0
fi
echo "installing chromium for the browser test (apt-get, about 25 s)"
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; }; then
    echo "warning: could not install chromium; the browser test will be skipped" >&2
fi
exit 0
