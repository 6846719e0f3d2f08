{
  description = "msgscript: Lua, WASM and podman functions answering NATS messages and HTTP requests";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      # lupa and wasmtime carry native code; nixpkgs builds both for these systems.
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      # `nix build` gives bin/msgscript and bin/msgscriptcli; see nix/package.nix for the dependencies.
      packages = forAllSystems (pkgs: {
        default = pkgs.callPackage ./nix/package.nix { };
      });

      # services.msgscript.enable = true; see nix/module.nix for the options.
      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./nix/module.nix ];
          services.msgscript.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.default ];
          packages = [
            pkgs.nats-server
            pkgs.etcd
            pkgs.ruff
            pkgs.python3Packages.pytest
          ];
        };
      });
    };
}
