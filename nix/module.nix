# NixOS module: services.msgscript runs `msgscript server` as a hardened systemd service.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:

let
  inherit (lib)
    concatStringsSep
    mkEnableOption
    mkIf
    mkOption
    optionals
    types
    ;

  cfg = config.services.msgscript;

  # The server's command line; tests/test_distribution.py feeds these flags to msgscript's parser.
  serverArgs = [
    "server"
    "-backend"
    cfg.backend
    "-etcdurl"
    (concatStringsSep "," cfg.etcdEndpoints)
    "-script"
    cfg.scriptDir
    "-library"
    cfg.libraryDir
    "-port"
    (toString cfg.port)
    "-log"
    cfg.logLevel
  ]
  ++ (
    if cfg.natsUrl != "" then
      [
        "-natsurl"
        cfg.natsUrl
      ]
    else
      [
        "-data"
        "${cfg.dataDir}/nats"
      ]
  )
  ++ optionals (cfg.nats.credsFile != null) [
    "-natscreds"
    "${cfg.nats.credsFile}"
  ]
  ++ optionals (cfg.nats.nkeyFile != null) [
    "-natsnkey"
    "${cfg.nats.nkeyFile}"
  ]
  ++ optionals (cfg.nats.tls.caFile != null) [
    "-natstls-ca"
    "${cfg.nats.tls.caFile}"
  ]
  ++ optionals (cfg.nats.tls.certFile != null) [
    "-natstls-cert"
    "${cfg.nats.tls.certFile}"
    "-natstls-key"
    "${cfg.nats.tls.keyFile}"
  ]
  ++ [
    "-admin"
    cfg.admin
    "-metrics"
    cfg.metrics
  ]
  ++ optionals (cfg.plugins != null) [
    "-plugin"
    "${cfg.plugins}"
  ]
  ++ cfg.extraFlags;

  defaultUser = "msgscript";
  privilegedPort = cfg.port < 1024;
in
{
  options.services.msgscript = {
    enable = mkEnableOption "msgscript, the Lua/WASM/podman function server for NATS and HTTP";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The msgscript package to run.";
    };

    backend = mkOption {
      type = types.enum [
        "file"
        "etcd"
        "nats"
      ];
      default = "file";
      description = "Where scripts are read from: files under scriptDir, etcd, or JetStream KV buckets on NATS (natsUrl, or the embedded NATS).";
    };

    etcdEndpoints = mkOption {
      type = types.listOf types.str;
      default = [ "http://127.0.0.1:2379" ];
      description = "etcd endpoints, for the etcd backend and the scripts' `etcd` module.";
    };

    natsUrl = mkOption {
      type = types.str;
      default = "";
      example = "nats://127.0.0.1:4222";
      description = "NATS server to connect to; empty starts an embedded nats-server bound to 127.0.0.1.";
    };

    nats = {
      credsFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "NATS credentials file (user JWT and nkey seed), for accounts and Synadia Cloud.";
      };
      nkeyFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "File holding the nkey seed (SU...) of a NATS nkey user.";
      };
      tls = {
        caFile = mkOption {
          type = types.nullOr types.path;
          default = null;
          description = "CA certificate(s) that signed the NATS server's certificate.";
        };
        certFile = mkOption {
          type = types.nullOr types.path;
          default = null;
          description = "Client certificate for NATS servers that verify clients (with keyFile).";
        };
        keyFile = mkOption {
          type = types.nullOr types.path;
          default = null;
          description = "Key of the client certificate.";
        };
      };
    };

    admin = mkOption {
      type = types.enum [
        "local"
        "public"
        "off"
      ];
      default = "local";
      description = "Who may read the /_/ admin pages (script sources): loopback clients, everyone, nobody.";
    };

    metrics = mkOption {
      type = types.enum [
        "local"
        "public"
        "off"
      ];
      default = "local";
      description = "Who may read GET /metrics (Prometheus text format).";
    };

    traces = {
      enable = mkEnableOption "OpenTelemetry traces (OTLP/HTTP)";
      endpoint = mkOption {
        type = types.str;
        default = "";
        example = "http://127.0.0.1:4318";
        description = "OTLP/HTTP collector; empty uses the standard OTEL_EXPORTER_OTLP_* variables.";
      };
    };

    plugins = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "Directory of extra Lua plugins (*.py files); the bundled plugins are always loaded.";
    };

    dataDir = mkOption {
      type = types.str;
      default = "/var/lib/msgscript";
      description = "Working directory of the service, owned by it and the only place it may write.";
    };

    scriptDir = mkOption {
      type = types.str;
      default = "${cfg.dataDir}/scripts";
      defaultText = lib.literalExpression ''"''${config.services.msgscript.dataDir}/scripts"'';
      description = "Directory of scripts for the file backend.";
    };

    libraryDir = mkOption {
      type = types.str;
      default = "${cfg.dataDir}/libs";
      defaultText = lib.literalExpression ''"''${config.services.msgscript.dataDir}/libs"'';
      description = "Directory of Lua libraries that scripts pull in with `--* require:`.";
    };

    user = mkOption {
      type = types.str;
      default = defaultUser;
      description = "User the service runs as; created when left at the default.";
    };

    group = mkOption {
      type = types.str;
      default = defaultUser;
      description = "Group the service runs as; created when left at the default.";
    };

    port = mkOption {
      type = types.port;
      default = 7643;
      description = "HTTP port.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the HTTP port in the firewall.";
    };

    logLevel = mkOption {
      type = types.enum [
        "trace"
        "debug"
        "info"
        "warn"
        "error"
        "fatal"
        "panic"
      ];
      default = "info";
      description = "Log level (the Go original's names; trace is debug, fatal and panic log only critical errors).";
    };

    extraFlags = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "-workers"
        "32"
      ];
      description = "Further `msgscript server` flags.";
    };
  };

  config = mkIf cfg.enable {
    systemd.services.msgscript = {
      description = "msgscript function server";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];

      environment = lib.optionalAttrs cfg.traces.enable (
        { TELEMETRY_TRACES = "1"; } // lib.optionalAttrs (cfg.traces.endpoint != "") { OTEL_ENDPOINT = cfg.traces.endpoint; }
      );

      serviceConfig = {
        # The server tells systemd when it serves (READY=1) and when it starts draining (STOPPING=1).
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${cfg.package}/bin/msgscript ${utils.escapeSystemdExecArgs serverArgs}";
        User = cfg.user;
        Group = cfg.group;
        WorkingDirectory = cfg.dataDir;
        Restart = "on-failure";
        RestartSec = 2;
        # The server drains in-flight calls on SIGTERM (30 s by default) before exiting.
        TimeoutStopSec = 45;

        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ReadWritePaths = [ cfg.dataDir ];
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectHostname = true;
        ProtectClock = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectProc = "invisible";
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        RemoveIPC = true;
        UMask = "0027";
        CapabilityBoundingSet = if privilegedPort then "CAP_NET_BIND_SERVICE" else "";
        AmbientCapabilities = if privilegedPort then "CAP_NET_BIND_SERVICE" else "";
        # AF_UNIX: the podman executor talks to podman's socket.
        RestrictAddressFamilies = [
          "AF_INET"
          "AF_INET6"
          "AF_UNIX"
        ];
        SystemCallArchitectures = "native";
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
        ];
        SystemCallErrorNumber = "EPERM";
        # No MemoryDenyWriteExecute: wasmtime compiles WebAssembly to machine code at run time.
      };
    };

    # Script and library directories elsewhere (say, in the Nix store) are the owner's business.
    systemd.tmpfiles.rules = map (dir: "d ${dir} 0750 ${cfg.user} ${cfg.group} - -") (
      [ cfg.dataDir ] ++ lib.filter (lib.hasPrefix "${cfg.dataDir}/") [ cfg.scriptDir cfg.libraryDir ]
    );

    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall [ cfg.port ];

    users.users = mkIf (cfg.user == defaultUser) {
      ${defaultUser} = {
        isSystemUser = true;
        group = cfg.group;
        home = cfg.dataDir;
        description = "msgscript service user";
      };
    };

    users.groups = mkIf (cfg.group == defaultUser) { ${defaultUser} = { }; };
  };
}
