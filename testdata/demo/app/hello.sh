#!/bin/sh
cat /app/greeting.txt
echo "running as $(id -un) in $(pwd) on $(hostname)"
if [ -e /etc/motd ]; then echo "/etc/motd is still there"; else echo "/etc/motd was deleted by a RUN step"; fi
