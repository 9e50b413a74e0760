"""tcpha configuration: the settings table (one declaration per option) and the TCPHA file loader.

    from tcpha.config import load_fe_config, ConfigError
    try:
        cfg = load_fe_config("/etc/tcpha/tcphafe.conf")
    except ConfigError as exc:      # str(exc) == "PATH:LINE: message"
        print(exc, file=sys.stderr); sys.exit(2)

See docs/configuration.md (generated from tcpha/config/settings.py) for every option.
"""

from tcpha.config.loader import (LOCAL_TARGET, MIN_KEY_BYTES, RULE_FIELDS, BEConfig, ConfigError,
                                 FEConfig, RuleSpec, ServerSpec, changed_options, compile_rule,
                                 load_be_config, load_fe_config, read_authkey, register_rules)
from tcpha.config.settings import BE_SETTINGS, FE_SETTINGS, Setting, settings_for
from tcpha.config.reference import add_help, dbglevel_to_logging, help_epilog

__all__ = ["ConfigError", "Setting", "FE_SETTINGS", "BE_SETTINGS", "ServerSpec", "RuleSpec",
           "FEConfig", "BEConfig", "LOCAL_TARGET", "MIN_KEY_BYTES", "RULE_FIELDS",
           "load_fe_config", "load_be_config", "read_authkey", "changed_options", "settings_for",
           "compile_rule", "register_rules",
           "help_epilog", "add_help", "dbglevel_to_logging"]
