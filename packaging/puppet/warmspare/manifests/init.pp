# @summary Installs and configures warmspare-agent on a node of a warmspare
#   cluster: the package, the cluster file written from data, the node's
#   private key, the service, and the role gate for services that may run
#   only on the active node (a CA).
#
# Give every node of a cluster the same `cluster`, `nodes`, `operators`,
# `watches` and `jobs` (from Hiera, common to the cluster), and each node its
# own `node_key`. The keys of each hash are the cluster file's keys
# (docs/configuration.md); the agent refuses a file with an unknown key or a
# bad value, naming the key and line.
#
# @param cluster The `[cluster]` table (`name` and `preferred_active` at least).
# @param nodes One hash per `[[node]]`.
# @param operators One hash per `[[operator]]`.
# @param watches One hash per `[[watch]]`.
# @param jobs One hash per `[[job]]`.
# @param node_key This node's private key, as `warmspare-agent keygen` writes it
#   (keep it in eyaml or another secret store). Left out, the key file is not
#   managed (generate it on the node with `warmspare-agent keygen`).
# @param config_dir Where the cluster file lives.
# @param key_file Where the node's key is written; the cluster's `key_file`
#   when it names one.
# @param manage_package Whether to install the `warmspare` package.
# @param package_ensure The package's ensure value.
# @param manage_service Whether to run and enable `warmspare-agent`; a changed
#   cluster file then reloads it (SIGHUP). A changed key needs a restart,
#   which is left to the operator.
# @param gated_services Services that may start only on the confirmed active
#   node (for example `['puppetserver']` on a Puppet CA): each gets the role
#   gate drop-in (`warmspare-agent role --is-active` in `ExecStartPre=`).
# @param systemd_dir Where drop-ins are written.
class warmspare (
  Hash[Pattern[/\A[a-z][a-z_]*\z/], Data]        $cluster,
  Array[Hash[Pattern[/\A[a-z][a-z_]*\z/], Data]] $nodes,
  Array[Hash[Pattern[/\A[a-z][a-z_]*\z/], Data]] $operators = [],
  Array[Hash[Pattern[/\A[a-z][a-z_]*\z/], Data]] $watches = [],
  Array[Hash[Pattern[/\A[a-z][a-z_]*\z/], Data]] $jobs = [],
  Optional[Sensitive[String[1]]]                 $node_key = undef,
  Pattern[/\A\//]                                $config_dir = '/etc/warmspare',
  Optional[Pattern[/\A\//]]                      $key_file = undef,
  Boolean                                        $manage_package = true,
  String[1]                                      $package_ensure = 'installed',
  Boolean                                        $manage_service = true,
  Array[Pattern[/\A[A-Za-z0-9@_.-]+\z/]]         $gated_services = [],
  Pattern[/\A\//]                                $systemd_dir = '/etc/systemd/system',
) {
  $cluster_file = "${config_dir}/cluster.toml"
  $key_path = [$key_file, $cluster['key_file'], "${config_dir}/node.key"].filter |$k| { $k =~ String }[0]

  if $manage_package {
    package { 'warmspare':
      ensure => $package_ensure,
      before => File[$config_dir],
    }
  }

  file { $config_dir:
    ensure => directory,
    owner  => 'root',
    group  => 'root',
    mode   => '0750',
  }

  # The agent refuses a cluster file that users other than root may write.
  file { $cluster_file:
    ensure  => file,
    owner   => 'root',
    group   => 'root',
    mode    => '0640',
    content => epp('warmspare/cluster.toml.epp', {
      'cluster'   => $cluster,
      'nodes'     => $nodes,
      'operators' => $operators,
      'watches'   => $watches,
      'jobs'      => $jobs,
    }),
  }

  if $node_key =~ NotUndef {
    file { $key_path:
      ensure    => file,
      owner     => 'root',
      group     => 'root',
      mode      => '0600',
      content   => $node_key,
      show_diff => false,
      require   => File[$config_dir],
    }
  }

  $gated_services.each |$service| {
    file { "${systemd_dir}/${service}.service.d":
      ensure => directory,
      owner  => 'root',
      group  => 'root',
      mode   => '0755',
    }
    file { "${systemd_dir}/${service}.service.d/warmspare-role-gate.conf":
      ensure  => file,
      owner   => 'root',
      group   => 'root',
      mode    => '0644',
      content => epp('warmspare/role-gate.conf.epp', { 'cluster_file' => $cluster_file }),
    }
    if $manage_service {
      File["${systemd_dir}/${service}.service.d/warmspare-role-gate.conf"] ~> Exec['warmspare daemon-reload']
    }
  }

  if $manage_service {
    exec { 'warmspare daemon-reload':
      command     => 'systemctl daemon-reload',
      path        => ['/usr/bin', '/bin'],
      refreshonly => true,
    }
    service { 'warmspare-agent':
      ensure    => running,
      enable    => true,
      restart   => 'systemctl reload warmspare-agent',
      subscribe => File[$cluster_file],
    }
    # A new key takes effect at the next restart (a reload keeps the key it
    # started with): not restarted from here, so a key rotation stays the
    # operator's step.
  }
}
