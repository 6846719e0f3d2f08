--* subject: funcs.podmanhello
--* name: podmanhello
--* executor: podman
--* timeout: 30s
{
  "image": "docker.io/library/busybox:latest",
  "command": ["/bin/sh", "-c", "echo \"Hello from a container, $(cat)! (subject $SUBJECT)\""]
}
